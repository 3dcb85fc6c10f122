"""The grounding loss: each caption word's cross-attention should fall on the object it names.

Plain denoising training leaves the attention free to route a word anywhere that helps the
prediction, so word maps are often flat or point at the wrong object. Where the data knows which
word names which object (the shapes dataset writes a mask per object and `word_objects` per
caption), a second loss asks every cross-attention layer to put each grounded token's attention
on its object, in the manner of TokenCompose's token loss (Wang et al., CVPR 2024):

    inside(t) = sum_p A[p, t] M_t[p] / sum_p A[p, t]        A: head-mean attention, M_t: the object's mask
    loss      = mean over grounded tokens and layers of (1 - inside(t))^2

That keeps a word's attention on its object but lets it shrink to a few pixels of it. An optional
coverage term (weight `coverage`) asks the attention to reach its own peak across the whole object:

    cover(t)  = sum_p M_t[p] (1 - A[p, t] / max_{p in M_t} A[p, t])^2 / sum_p M_t[p]      (the peak held fixed)

An image's objects can only be located in proportion to the signal left in it, so each image's
term is weighted by alpha_bar(t), the signal fraction of its noise level (0 at pure noise).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from diffusion.text.prompt_tokens import prompt_tokens


def token_objects(
    tokenizer: PreTrainedTokenizerBase, caption: str, word_objects: list[int], max_length: int
) -> torch.Tensor:
    """(max_length,) long: for each token position, the object id its word names (0: none, padding, start, end)."""
    tokens = prompt_tokens(tokenizer, caption, max_length)
    ids = [0 if word is None else word_objects[word] for word in tokens.word_of_token]
    return torch.tensor(ids + [0] * tokens.num_padding)


class TokenObjectTable:
    """token_objects for every (caption, word_objects) pair, computed once and reused every step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.lookup = lru_cache(maxsize=None)(
            lambda caption, objects: token_objects(tokenizer, caption, list(objects), max_length)
        )

    def __call__(self, captions: list[str], word_objects: list[list[int]]) -> torch.Tensor:
        """(B, T) object id per token; an empty caption (dropped for guidance) grounds nothing."""
        return torch.stack([self.lookup(c, tuple(o if c else [])) for c, o in zip(captions, word_objects)])


class GroundingLoss:
    """An AttentionRecorder for training: adds up the grounding loss of every cross-attention layer.

    token_objects: (B, T) object id per token (0: not grounded); masks: (B, S, S) object ids below
    `num_objects` (fixed per dataset, so that no step reads the masks back to the host);
    weights: (B,) per-image weight (alpha_bar of its timestep).
    """

    def __init__(
        self, token_objects: torch.Tensor, masks: torch.Tensor, num_objects: int, weights: torch.Tensor, coverage: float = 0.0
    ):
        self.coverage = coverage
        self.token_objects = token_objects.long()
        self.object_masks = object_masks(masks, num_objects)  # (B, K, S, S)
        grounded = (self.token_objects > 0).float()  # (B, T)
        self.token_weights = grounded * weights[:, None].float()  # (B, T)
        self.num_grounded = grounded.sum().clamp(min=1.0)
        self.per_layer: dict[str, torch.Tensor] = {}
        self._cells: dict[int, torch.Tensor] = {}

    def masks_at(self, size: int) -> torch.Tensor:
        """(B, K, size*size): the fraction of each feature-map cell covered by each object."""
        if size not in self._cells:
            self._cells[size] = F.adaptive_avg_pool2d(self.object_masks, size).flatten(2)
        return self._cells[size]

    def __call__(self, layer_name: str, probs: torch.Tensor) -> None:
        b, _, hw, t = probs.shape  # (B, heads, HW, T)
        size = math.isqrt(hw)
        # 1. Each token's attention over the pixels, averaged over heads.
        attention = probs.float().mean(dim=1).transpose(1, 2)  # (B, T, HW)
        # 2. The mask of the object each token names, at this layer's resolution (zeros if none).
        cells = self.masks_at(size)  # (B, K, HW)
        token_masks = cells.gather(1, self.token_objects[:, :t, None].expand(b, t, hw))  # (B, T, HW)
        # 3. The fraction of each token's attention that lands on its object.
        inside = (attention * token_masks).sum(-1) / attention.sum(-1).clamp(min=1e-8)  # (B, T)
        shortfall = (1 - inside) ** 2  # (B, T)
        # 4. Optionally, how far the attention on the object falls below its peak there.
        if self.coverage > 0:
            peak = (attention * (token_masks > 0)).amax(dim=-1, keepdim=True).detach().clamp(min=1e-8)  # (B, T, 1)
            below_peak = (1 - attention / peak).clamp(min=0) ** 2  # (B, T, HW)
            cover = (token_masks * below_peak).sum(-1) / token_masks.sum(-1).clamp(min=1e-8)  # (B, T)
            shortfall = shortfall + self.coverage * cover
        # 5. Weighted per image, averaged over grounded tokens.
        self.per_layer[layer_name] = (shortfall * self.token_weights[:, :t]).sum() / self.num_grounded

    def value(self) -> torch.Tensor:
        """The mean over the layers seen so far (a scalar with gradient)."""
        if not self.per_layer:
            raise RuntimeError("the UNet reported no cross-attention layer; the grounding loss needs at least one")
        return torch.stack(list(self.per_layer.values())).mean()


def object_masks(masks: torch.Tensor, num_objects: int) -> torch.Tensor:
    """(B, S, S) object ids below `num_objects` -> (B, K, S, S) float, 1 where pixel p shows object k."""
    ids = torch.arange(num_objects, device=masks.device)  # (K,)
    return (masks.long()[:, None] == ids[None, :, None, None]).float()  # (B, K, S, S)


def object_centres(masks: torch.Tensor, token_objects: torch.Tensor, num_objects: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's object centre (B, T, 2), x then y in [-1, 1] (left/top = -1), and whether it has one (B, T).

    masks: (B, S, S) object id per pixel, below `num_objects`; token_objects: (B, T) object id per token (0: none)."""
    b, size, _ = masks.shape
    objects = object_masks(masks, num_objects)  # (B, K, S, S)
    coords = torch.linspace(-1, 1, size, device=masks.device)  # (S,) pixel centres, left/top to right/bottom
    pixels = objects.sum(dim=(2, 3))  # (B, K)
    area = pixels.clamp(min=1)  # (B, K)
    x = (objects * coords[None, None, None, :]).sum(dim=(2, 3)) / area  # (B, K)
    y = (objects * coords[None, None, :, None]).sum(dim=(2, 3)) / area  # (B, K)
    centres = torch.stack([x, y], dim=-1)  # (B, K, 2)
    ids = token_objects.long().clamp(max=num_objects - 1)  # (B, T)
    known = (token_objects > 0) & (pixels.gather(1, ids) > 0)  # (B, T) an object the mask shows
    return centres.gather(1, ids[..., None].expand(b, ids.shape[1], 2)), known
