"""The sampler's choices, in one frozen dataclass: their defaults, command-line flags, checks and
manifest record. sample.py, the evaluation, training's validation and export, and the pipeline all
take a `SamplerSettings` whole, so a default is written once. Pure Python: no torch.

DDPM's ancestral steps add fresh noise at every step (drawn from each image's own generator, so an
image still regenerates alone from its seed). On the default model they copy objects far less often
than deterministic DDIM, and more so with more steps (BENCHMARKS.md, "Sampler").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from diffusion.errors import UserError

SCHEDULER_NAMES = ("ddim", "dpm++", "euler", "ddpm")  # diffusion.sampling.schedulers builds each


class SamplerSettingsError(UserError, ValueError):
    """A sampler setting out of range; the message names the flag."""


@dataclass(frozen=True)
class SamplerSettings:
    scheduler: str = "ddpm"
    steps: int = 100  # denoising steps
    guidance: float = 3.0  # classifier-free guidance scale; 1 = none
    # Strength of the steering that makes the relations a prompt states hold in its attention maps
    # during the first steps (diffusion.sampling.layout_guidance); 0 = off.
    layout_guidance: float = 0.05

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULER_NAMES:
            raise SamplerSettingsError(f"unknown --scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
        if self.steps < 1:
            raise SamplerSettingsError(f"--steps must be at least 1, got {self.steps}")
        if self.guidance < 0:
            raise SamplerSettingsError(f"--guidance must be >= 0 (1 turns guidance off), got {self.guidance}")
        if self.layout_guidance < 0:
            raise SamplerSettingsError(f"--layout-guidance must be >= 0 (0 turns it off), got {self.layout_guidance}")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """--scheduler, --steps, --guidance and --layout-guidance, with these defaults."""
        d = SamplerSettings()
        parser.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default {d.steps})")
        parser.add_argument(
            "--guidance", type=float, default=d.guidance, help=f"classifier-free guidance scale; 1 = none (default {d.guidance:g})"
        )
        parser.add_argument("--scheduler", default=d.scheduler, help=f"{', '.join(SCHEDULER_NAMES)} (default {d.scheduler})")
        parser.add_argument(
            "--layout-guidance", type=float, default=d.layout_guidance,
            help="strength of the steering that makes the relations a prompt states ('left of', 'above', ...) hold in "
            f"its attention maps during the first steps (diffusion/sampling/layout_guidance.py); 0 = off (default {d.layout_guidance:g})",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplerSettings:
        return cls(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance, layout_guidance=args.layout_guidance)

    def manifest(self) -> dict:
        """What an image's manifest records of the sampler that made it."""
        return {
            "scheduler": self.scheduler, "steps": self.steps, "guidance_scale": self.guidance,
            "layout_guidance": self.layout_guidance,
        }
