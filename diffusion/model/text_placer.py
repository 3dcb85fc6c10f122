"""Where each word's object goes, read from the whole prompt and written into its text state.

CLIP's text tower is causal and, trained contrastively, keeps a relation's axis but not its
direction: in its last layer the states of "a red circle left of a blue square" and "... right
of ..." are 0.99 alike, where the input embeddings of "left" and "right" are 0.60 alike
(BENCHMARKS.md, relations). So the placer reads both: each token's last state beside its input
embedding (word + position), each normalised on its own (their norms are about 11 and 0.3).

A few bidirectional transformer layers, told each token's index in the prompt (which object comes
before "left of" is the whole relation), predict each token's object centre (x, y) in [-1, 1]. A
prompt leaves much of its layout open ("A right of B and C right of B" says nothing of A against C),
and one regressed centre per token is the mean of every layout the prompt allows: A and C on one
spot. So the placer proposes `layouts` whole layouts per prompt (K centres per token); training
fits the one nearest the image's masks, winner takes all (`place_loss` in
diffusion/training/objective.py), and shows the UNet that one; sampling draws one per seed
(`seed_layouts` in diffusion/sampling/loop.py). A linear code of the chosen layout's centre is added
to each token's state, so the keys and values the cross-attention reads carry where the object
goes. The placer reads the states detached: no loss reaches the text tower through it, so the
tower keeps its shape words (through the placer, the denoising loss made `triangle` and `star`
0.997 alike):

    h       = W_in [LN(last state) | LN(input embedding)] + position(t)    (B, T, W)
    h       = bidirectional layers(h, mask)                                 (B, T, W)
    centres = tanh(W_c h)                                                   (B, T, K, 2)   x: -1 left .. 1 right; y: -1 top .. 1 bottom
    states' = states + W_s centres[:, :, k]                                 (B, T, 2D)     k: the layout chosen per image
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.model.attention import attention, merge_heads, split_heads


def token_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Sine-cosine codes of the token indices 0..length-1: (length, dim)."""
    index = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (T, 1)
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device) / dim)  # (D/2,)
    angles = index * frequencies  # (T, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :dim]  # (T, D)


class BidirectionalLayer(nn.Module):
    """Tokens attend to every unmasked token of their prompt (no causal mask), then a per-token MLP.
    Pre-norm, residual, with zero-initialised output projections: untrained, it passes states through."""

    def __init__(self, dim: int, head_dim: int, mlp_mult: int = 4):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, mlp_mult * dim)
        self.mlp_out = nn.Linear(mlp_mult * dim, dim)
        for projection in (self.attn_out, self.mlp_out):
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qkv = self.to_qkv(self.attn_norm(states)).chunk(3, dim=-1)  # 3 x (B, T, D)
        q, k, v = (split_heads(x, self.heads) for x in qkv)  # (B, heads, T, d)
        mixed, _ = attention(q, k, v, key_mask=mask)  # (B, heads, T, d)
        states = states + self.attn_out(merge_heads(mixed))  # (B, T, D)
        return states + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(states))))  # (B, T, D)


class TextPlacer(nn.Module):
    """(text states (B, T, 2D): last state | input embedding, mask (B, T), layout (B,)) -> the states
    with the code of each token's object centre in the image's layout added."""

    def __init__(self, dim: int, num_layers: int, width: int, head_dim: int, layouts: int = 1):
        super().__init__()
        self.layouts = layouts
        self.to_width = nn.Linear(dim, width)  # the placer works at its own, narrower width
        self.layers = nn.ModuleList(BidirectionalLayer(width, head_dim) for _ in range(num_layers))
        self.to_centre = nn.Linear(width, 2 * layouts)
        self.from_centre = nn.Linear(2, dim)

    def centres(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Each token's object centre in each proposed layout (B, T, K, 2), x then y, in [-1, 1]."""
        # Each half normalised on its own: the input embeddings (norm ~0.3) beside the last states (~11).
        h = torch.cat([F.layer_norm(half, half.shape[-1:]) for half in states.chunk(2, dim=-1)], dim=-1)  # (B, T, 2D)
        h = self.to_width(h)  # (B, T, W)
        h = h + token_positions(h.shape[1], h.shape[2], h.device).to(h.dtype)  # (B, T, W)
        for layer in self.layers:
            h = layer(h, mask)
        return torch.tanh(self.to_centre(h)).unflatten(-1, (self.layouts, 2))  # (B, T, K, 2)

    def forward(
        self, states: torch.Tensor, mask: torch.Tensor | None, layout: torch.Tensor | None = None, centres: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`layout`: (B,) the layout to follow per image (None: the first); `centres`: `self.centres(states,
        mask)` where the caller has it already (training computes it for the place loss)."""
        if centres is None:
            # Read detached: no loss reaches the text tower through the placer (as none did through the
            # oracle's side code); the tower learns only from what the cross-attention reads.
            centres = self.centres(states.detach(), mask)  # (B, T, K, 2)
        if layout is None:
            layout = torch.zeros(states.shape[0], dtype=torch.long, device=states.device)
        chosen = centres[torch.arange(states.shape[0], device=states.device), :, layout]  # (B, T, 2)
        return states + self.from_centre(chosen)  # (B, T, 2D)


def layout_errors(centres: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each proposed layout to the true one, over the tokens whose object is
    known: centres (B, T, K, 2), target (B, T, 2), known (B, T) -> (B, K)."""
    squared = ((centres - target[:, :, None]) ** 2).sum(-1)  # (B, T, K)
    weights = known.float()[:, :, None]  # (B, T, 1)
    return (squared * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, K)


def choose_layouts(errors: torch.Tensor, known: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, the layout nearest the truth; a random one where no token's object is known: (B,)."""
    nearest = errors.argmin(dim=1)  # (B,)
    device = nearest.device if generator is None else generator.device  # a generator draws on its own device
    random = torch.randint(errors.shape[1], nearest.shape, generator=generator, device=device).to(nearest.device)
    return torch.where(known.any(dim=1), nearest, random)  # (B,)
