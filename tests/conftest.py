"""Shared fixtures: the tiny preset's dataset, text encoder and one finished training run."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.config import load_config
from diffusion.training.loop import train

ROOT = Path(__file__).parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(cache_dir, *overrides):
    return load_config(TINY, [f"cache_dir={cache_dir}", *overrides])


def unet_args(sample_size: int, context_dim: int, **changes) -> dict:
    """UNet's arguments: the default model's (diffusion.config.UNetConfig) with `changes`."""
    from dataclasses import asdict

    from diffusion.config import UNetConfig

    return {"sample_size": sample_size, "context_dim": context_dim, **asdict(UNetConfig(**changes))}


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Dataset and tiny CLIP for the tiny preset, built once for the whole session."""
    from diffusion.training.prepare import prepare_text_encoder

    cache = tmp_path_factory.mktemp("cache")
    cfg = tiny_config(cache)
    prepare_text_encoder(cfg.text_encoder, cfg.data, cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def finished_run(cache_dir, tmp_path_factory):
    """A tiny run trained to its end (40 steps), with checkpoints at 20 and 40 and an export."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(cache_dir), output_dir=str(run_dir), progress=False, device="cpu")
    return run_dir
