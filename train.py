"""Train the text-conditioned UNet.

    python train.py                                   # the CPU default (configs/cpu.yaml)
    accelerate launch train.py --config configs/gpu.yaml --output-dir outputs/runs/big
    python train.py --config configs/tiny.yaml train.max_steps=100 train.batch_size=8
    python train.py --resume latest --output-dir outputs/runs/cpu
    python train.py --device cpu                      # the CPU even where there is a GPU (default: auto)
    python train.py --dry-run                         # print the resolved config and model size
    python train.py --prepare-only                    # just build the dataset and the tiny CLIP
"""

from __future__ import annotations

import argparse
import sys

from diffusion.config import load_config
from diffusion.devices import add_device_argument
from diffusion.errors import exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cpu.yaml", help="YAML preset (default: %(default)s)")
    parser.add_argument("--output-dir", help="run folder (default: outputs/runs/<config name>, numbered if taken)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder of the run in --output-dir")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count, then exit")
    parser.add_argument("--prepare-only", action="store_true", help="build the dataset and text encoder, then exit")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="single-field overrides such as train.learning_rate=3e-4")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from diffusion.training.setup import dry_run_report

        print(dry_run_report(cfg))
        return
    if args.prepare_only:
        from diffusion.training.prepare import prepare_text_encoder

        print(prepare_text_encoder(cfg.text_encoder, cfg.data, cfg.cache_dir, progress=not args.no_progress))
        return
    from diffusion.training.loop import train

    train(cfg, output_dir=args.output_dir, resume=args.resume, progress=not args.no_progress, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
