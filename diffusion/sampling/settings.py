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


# An edit's defaults, chosen on the edit benchmark (BENCHMARKS.md, "Editing"): the source's cross-attention for
# the first 60% of the steps (at 80%, prompt-to-prompt's default, an added size word takes hold less often), its
# self-attention for the first 40%.
CROSS_REPLACE = 0.6
SELF_REPLACE = 0.4


class EditSettingsError(UserError, ValueError):
    """An edit setting out of range or badly written; the message names the flag."""


def parse_word_values(texts: list[str], flag: str) -> tuple[tuple[str, float], ...]:
    """['red=2', 'circle=0.5'] -> (('red', 2.0), ('circle', 0.5)); a clear message for anything else."""
    pairs = []
    for text in texts:
        word, sep, value = text.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not word.strip() or number is None:
            raise EditSettingsError(f"{flag} {text!r}: write WORD=NUMBER, e.g. {flag} red=2")
        pairs.append((word.strip(), number))
    return tuple(pairs)


@dataclass(frozen=True)
class EditSettings:
    """A prompt-to-prompt edit's choices (diffusion.sampling.edit): how long the edited prompt's image takes
    the source's attention, and which words it scales. Fractions are of the sampling steps, the first ones."""

    cross_replace: float = CROSS_REPLACE  # the edit's cross-attention maps are the source's for this fraction
    self_replace: float = SELF_REPLACE  # and its self-attention maps for this fraction
    cross_replace_words: tuple[tuple[str, float], ...] = ()  # (word of the edited prompt, its own fraction)
    reweight: tuple[tuple[str, float], ...] = ()  # (word of the edited prompt, factor on its attention)

    def __post_init__(self) -> None:
        fractions = [("--cross-replace", None, self.cross_replace), ("--self-replace", None, self.self_replace)]
        fractions += [("--cross-replace", word, f) for word, f in self.cross_replace_words]
        for flag, word, fraction in fractions:
            if not 0.0 <= fraction <= 1.0:
                given = f"{word}={fraction:g}" if word else f"{fraction:g}"
                raise EditSettingsError(f"{flag} {given}: a fraction of the sampling steps must lie in [0, 1]")
        for word, weight in self.reweight:
            if not 0.0 <= weight < float("inf"):
                raise EditSettingsError(f"--reweight {word}={weight:g}: a word's weight must be >= 0 (1 leaves it)")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """--edit, --cross-replace, --self-replace and --reweight."""
        group = parser.add_argument_group("editing (prompt-to-prompt: keep the source's layout while words change)")
        group.add_argument(
            "--edit", action="append", default=[],
            help="an edited prompt, one per --prompt: each seed samples the prompt and its edit side by side, the edit "
            "taking the prompt's attention maps",
        )
        group.add_argument(
            "--cross-replace", action="append", default=[], metavar="F or WORD=F",
            help=f"the fraction of the first steps in which the edit takes the source's cross-attention maps "
            f"(default {CROSS_REPLACE:g}); WORD=F sets one word's own fraction (repeatable)",
        )
        group.add_argument(
            "--self-replace", type=float, default=SELF_REPLACE,
            help=f"the fraction of the first steps in which the edit takes the source's self-attention maps (default {SELF_REPLACE:g})",
        )
        group.add_argument(
            "--reweight", action="append", default=[], metavar="WORD=W",
            help="scale a word's attention in the edit by W (repeatable; with no --edit, the edit is the prompt itself)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EditSettings:
        plain = [text for text in args.cross_replace if "=" not in text]
        if len(plain) > 1:
            raise EditSettingsError(f"--cross-replace given {len(plain)} plain fractions ({', '.join(plain)}); give one, and WORD=F for single words")
        try:
            cross = float(plain[0]) if plain else CROSS_REPLACE
        except ValueError:
            raise EditSettingsError(f"--cross-replace {plain[0]!r}: write a fraction, e.g. 0.8, or WORD=F") from None
        return cls(
            cross_replace=cross, self_replace=args.self_replace,
            cross_replace_words=parse_word_values([t for t in args.cross_replace if "=" in t], "--cross-replace"),
            reweight=parse_word_values(args.reweight, "--reweight"),
        )

    def manifest(self) -> dict:
        """What an edited image's manifest records of the edit's settings."""
        return {
            "cross_replace": self.cross_replace, "self_replace": self.self_replace,
            "cross_replace_words": dict(self.cross_replace_words), "reweight": dict(self.reweight),
        }
