"""Bidirectional transformer layers over the text states, before the UNet's cross-attention reads them.

CLIP's text tower is causal: in "a red circle left of a blue square" the state of "circle" has not
seen "left of", so no key made from it can say "I am the one on the left". A few layers in which
every token reads the whole prompt give each object's words the relation and the rest of the scene.
Each layer is pre-norm self-attention over the tokens, then an MLP, both residual with
zero-initialised output projections: an untrained refiner passes the text states through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.model.attention import attention, merge_heads, split_heads


class TextRefinerLayer(nn.Module):
    """Tokens attend to every unmasked token of their prompt (no causal mask), then a per-token MLP."""

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
        # 1. Every token attends to the prompt's real tokens, before and after it.
        qkv = self.to_qkv(self.attn_norm(states)).chunk(3, dim=-1)  # 3 x (B, T, D)
        q, k, v = (split_heads(x, self.heads) for x in qkv)  # (B, heads, T, d)
        mixed, _ = attention(q, k, v, key_mask=mask, return_probs=False)  # (B, heads, T, d)
        states = states + self.attn_out(merge_heads(mixed))  # (B, T, D)
        # 2. Per-token MLP.
        return states + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(states))))  # (B, T, D)


class TextRefiner(nn.Module):
    """(text states (B, T, D), mask (B, T)) -> refined states (B, T, D), token order and count kept."""

    def __init__(self, dim: int, num_layers: int, head_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(TextRefinerLayer(dim, head_dim) for _ in range(num_layers))

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            states = layer(states, mask)
        return states
