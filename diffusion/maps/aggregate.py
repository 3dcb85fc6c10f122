"""Aggregating cross-attention maps over layers and denoising steps, as the literature does.

Per layer: the probabilities (B, heads, HW, T) of the conditional rows are averaged over heads and
added to a running sum at the layer's own resolution, so memory does not grow with the number of
steps (with `keep_heads`, each head's own sum beside it). At the end each layer's mean is upsampled to the image size, and the global map is the mean
over layers. Optional per-step snapshots keep the global map at chosen steps, and beside it the
step's estimate of the clean image, so a viewer can show the map forming as the image emerges.

The aggregator is a sampling hook by its methods (those of diffusion.sampling.loop.SamplingHook, which
this layer below the sampler does not import): the loop asks its `recorder(step_index, timestep)` for
each step's recorder and passes it to the UNet explicitly: no global hooks, no call counting.
`ImageAttention` holds one image's share of the result, keyed by its prompt's tokens and words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.model.attention import AttentionRecorder
from diffusion.text.prompt_tokens import PromptTokens


@dataclass
class MapSettings:
    """What to aggregate; every choice is written into the manifest beside the maps."""

    # Keep each layer's own map as well as the global mean over layers.
    keep_layers: bool = True
    # Keep each layer's map per attention head as well (sample.py --head-maps).
    keep_heads: bool = False
    # Snapshot the global map after every N-th step (0: none).
    snapshot_every: int = 0
    # Aggregate only steps whose timestep lies in [low, high] (None: all steps).
    timestep_range: tuple[int, int] | None = None
    upsample_mode: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttentionMaps:
    """Maps of one batch of B images: every array is (B, T, S, S) float32, tokens in prompt order."""

    global_map: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, heads, T, S, S), with keep_heads
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step index -> global map
    denoised: dict[int, torch.Tensor] = field(default_factory=dict)  # step index -> x_0 estimate (B, C, S, S)
    steps_aggregated: list[int] = field(default_factory=list)  # timesteps summed into the maps


@dataclass
class ImageAttention:
    """The maps of one image: arrays (T, S, S) over its kept tokens, plus the token -> word key."""

    tokens: PromptTokens
    global_map: torch.Tensor  # (T, S, S)
    layers: dict[str, torch.Tensor]  # layer name -> (T, S, S), the mean over its heads
    heads: dict[str, torch.Tensor]  # layer name -> (heads, T, S, S), with MapSettings.keep_heads
    snapshots: dict[int, torch.Tensor]  # step index -> (T, S, S)
    snapshot_images: dict[int, Image.Image]  # step index -> the step's estimate of the clean image
    steps_aggregated: list[int]
    layer_resolutions: dict[str, int]
    settings: MapSettings

    def word_maps(self, maps: torch.Tensor | None = None) -> torch.Tensor:
        """(W, S, S): each word's map, the mean of its tokens' maps."""
        maps = self.global_map if maps is None else maps
        if not self.tokens.words:
            return maps.new_zeros((0, *maps.shape[1:]))
        return torch.stack([maps[self.tokens.token_indices(w)].mean(0) for w in range(len(self.tokens.words))])


class AttentionAggregator:
    """Accumulates the conditional half's maps of a guided batch over steps and layers (a sampling hook)."""

    def __init__(self, batch_size: int, image_size: int, settings: MapSettings | None = None):
        self.batch_size = batch_size
        self.image_size = image_size
        self.settings = settings or MapSettings()
        self.sums: dict[str, torch.Tensor] = {}  # layer -> (B, T, r, r) running sum
        self.head_sums: dict[str, torch.Tensor] = {}  # layer -> (B, heads, T, r, r), with keep_heads
        self.counts: dict[str, int] = {}
        self.snapshots: dict[int, torch.Tensor] = {}
        self.denoised: dict[int, torch.Tensor] = {}
        self.steps_aggregated: list[int] = []

    def before_step(self, step_index: int, timestep: int, x: torch.Tensor, denoise) -> torch.Tensor:
        return x  # it only observes

    def recorder(self, step_index: int, timestep: int) -> AttentionRecorder | None:
        """The recorder to pass to the UNet at this step, or None to skip recording it."""
        window = self.settings.timestep_range
        if window is not None and not window[0] <= timestep <= window[1]:
            return None
        self.steps_aggregated.append(timestep)

        def record(layer_name: str, probs: torch.Tensor) -> None:
            # 1. Conditional rows only (they come first in a guided batch); mean over heads.
            per_pixel = probs[: self.batch_size].float().mean(dim=1)  # (B, HW, T)
            b, hw, t = per_pixel.shape
            side = int(round(hw**0.5))
            # 2. Add to this layer's running sum at its own resolution.
            as_images = per_pixel.transpose(1, 2).reshape(b, t, side, side)  # (B, T, r, r)
            add(self.sums, layer_name, as_images)
            if self.settings.keep_heads:  # (B, heads, T, r, r)
                add(self.head_sums, layer_name, probs[: self.batch_size].float().transpose(2, 3).unflatten(-1, (side, side)))
            self.counts[layer_name] = self.counts.get(layer_name, 0) + 1

        return record

    def self_recorder(self, step_index: int, timestep: int) -> AttentionRecorder | None:
        return None  # cross-attention maps only

    def after_step(self, step_index: int, timestep: int, denoised: torch.Tensor) -> None:
        """Snapshot the global map, and the step's x_0 estimate (B, C, S, S), every `snapshot_every` steps."""
        every = self.settings.snapshot_every
        if every > 0 and (step_index + 1) % every == 0 and self.sums:
            self.snapshots[step_index] = self._global(self._layer_means())
            self.denoised[step_index] = denoised.detach().float().clamp(-1, 1)  # on the device until the pipeline hands it over

    def _upsample(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.shape[-1] == self.image_size:
            return maps
        mode = self.settings.upsample_mode
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        return F.interpolate(maps, size=(self.image_size, self.image_size), mode=mode, **kwargs)

    def _head_means(self) -> dict[str, torch.Tensor]:
        """Each layer's per-head mean over the steps, upsampled to the image: (B, heads, T, S, S)."""
        return {
            name: self._upsample((total / self.counts[name]).flatten(1, 2)).unflatten(1, total.shape[1:3])
            for name, total in self.head_sums.items()
        }

    def _layer_means(self) -> dict[str, torch.Tensor]:
        """Each layer's mean over the steps so far, upsampled to the image: (B, T, S, S)."""
        return {name: self._upsample(total / self.counts[name]) for name, total in self.sums.items()}

    @staticmethod
    def _global(layer_means: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(layer_means.values())).mean(dim=0)  # (B, T, S, S)

    def result(self) -> AttentionMaps:
        if not self.sums:
            raise RuntimeError("no attention was recorded: the timestep range excluded every step")
        layers = self._layer_means()
        return AttentionMaps(
            global_map=self._global(layers),
            layers=layers if self.settings.keep_layers else {},
            heads=self._head_means(),
            snapshots=dict(self.snapshots),
            denoised=dict(self.denoised),
            steps_aggregated=list(self.steps_aggregated),
        )


def add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Add `value` to the running sum `sums[name]` (a copy of it, the first time)."""
    if name in sums:
        sums[name] += value
    else:
        sums[name] = value.clone()
