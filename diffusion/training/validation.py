"""Validation during training: the validation prompts sampled with the EMA weights, saved with their
maps (validation/step_NNNNNN/), as one grid (validation/step_NNNNNN.png) and to the trackers."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image

from diffusion.config import TrainConfig
from diffusion.images import tile
from diffusion.maps.export import slug
from diffusion.maps.aggregate import MapSettings
from diffusion.model.unet import UNet
from diffusion.sampling.generate import Job, generate
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.schedulers import make_sampling_scheduler
from diffusion.sampling.settings import SamplerSettings
from diffusion.text.encoder import TextEncoder
from diffusion.training.trackers import log_grid

GRID_SCALE = 4  # validation grids are upscaled this many times (nearest neighbour) for viewing
OWN_PROMPTS = 6  # captions of a dataset of one's own that stand in for the shapes validation prompts


def own_validation_prompts(cfg, captions: list[str]) -> list[str] | None:
    """A dataset of one's own left with the built-in shapes validation prompts gets six of its own distinct
    captions (a seeded choice) instead; None where train.validation_prompts stays as it is."""
    if cfg.data.dataset == "shapes" or cfg.train.validation_prompts != TrainConfig().validation_prompts:
        return None
    by_file = {slug(c): c for c in captions}  # one caption per file name, so that no image overwrites another
    distinct = list(by_file.values())
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    return [distinct[i] for i in order[:OWN_PROMPTS]]


def validate(
    run_dir: Path, step: int, unet: UNet, encoder: TextEncoder, noise_config: dict, t: TrainConfig, accelerator: Accelerator
) -> None:
    """Sample the validation prompts (seed 0) with the weights `unet` and `encoder` hold now."""
    settings = SamplerSettings(steps=t.validation_steps)  # the sampler's defaults otherwise: what sample.py gives
    pipe = TextToImagePipeline(
        unet, make_sampling_scheduler(settings.scheduler, noise_config), encoder.model, encoder.tokenizer
    )
    jobs = [Job(prompt, seed=0) for prompt in t.validation_prompts]
    paths = generate(
        pipe, jobs, run_dir / "validation" / f"step_{step:06d}", settings, batch_size=len(jobs), maps=MapSettings(),
        extra_manifest={"training_step": step}, progress=False,
    )
    grid = tile([Image.open(p).convert("RGB") for p in paths], columns=len(paths))
    grid = grid.resize((grid.width * GRID_SCALE, grid.height * GRID_SCALE), Image.NEAREST)
    grid.save(run_dir / "validation" / f"step_{step:06d}.png")
    log_grid(accelerator, grid, step)
