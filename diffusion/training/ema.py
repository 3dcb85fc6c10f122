"""Exponential moving averages of the trained weights, swapped in for validation and export."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from diffusers.training_utils import EMAModel
from torch import nn


@contextmanager
def ema_weights(pairs: list[tuple[EMAModel, nn.Module]]) -> Iterator[None]:
    """Each module holds its EMA weights inside the block; its trained weights come back after it."""
    for average, module in pairs:
        average.store(module.parameters())
        average.copy_to(module.parameters())
    try:
        yield
    finally:
        for average, module in pairs:
            average.restore(module.parameters())
