import sys

from diffusion.viewer.report import main

sys.exit(main())
