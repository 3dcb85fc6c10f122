"""python -m diffusion.evaluation --model ...: the evaluation's command (diffusion.evaluation.cli)."""

import sys

from diffusion.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
