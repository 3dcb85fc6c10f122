"""Our own attention layers: cross-attention from image features to text tokens, and self-attention.

Cross-attention is the point of the project. Queries come from the noisy image features, keys and
values from the CLIP text hidden states; padding tokens are masked out. Two paths compute it:

* the fused fast path (`F.scaled_dot_product_attention`), used for training and plain sampling;
* an explicit path that materialises the attention probabilities (B, heads, HW, tokens), taken
  only when a caller passes an `AttentionRecorder`. The recorder reads them and may return others
  for the layer to use instead (a controller: prompt-to-prompt editing, diffusion.sampling.edit).
  Nothing is recorded or replaced behind the caller's back: no global hooks, no call counters.

Self-attention takes the explicit path the same way, when a caller passes a recorder for it.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class AttentionRecorder(Protocol):
    """Receives the attention probabilities of each layer it is passed to, on the explicit path."""

    def __call__(self, layer_name: str, probs: torch.Tensor) -> torch.Tensor | None:
        """`probs`: (B, heads, queries, keys), each row summing to one over the unmasked keys. Returns
        None to leave them as they are, or a tensor of the same shape that the layer uses instead."""


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
    control: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention. q: (B, h, N, d); k, v: (B, h, T, d); key_mask: (B, T) bool, True = attend.

    Returns the output (B, h, N, d) and, on the explicit path (taken when `control` is given), the
    probabilities (B, h, N, T) it used: `control(probs)` sees them first and may return others.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
    if control is None:
        if q.device.type == "cpu" and torch.is_grad_enabled():
            # PyTorch's CPU flash kernel is fast forward but its backward is 3-7x slower than the
            # math kernel at our sizes (few keys, short heads); see BENCHMARKS.md.
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    # 1. Similarities of every query with every key, scaled by 1/sqrt(d).
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, T)
    # 2. Padding tokens get zero probability.
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # 3. Softmax over tokens (in float32 for accuracy under autocast); the caller may read or replace them.
    probs = scores.float().softmax(dim=-1)  # (B, h, N, T)
    replaced = control(probs)
    if replaced is not None:
        probs = replaced  # (B, h, N, T)
    # 4. Mix the values.
    return probs.to(v.dtype) @ v, probs  # (B, h, N, d)


def on_layer(recorder: AttentionRecorder | None, layer_name: str) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """The recorder as `attention`'s `control` for one layer (None stays None: the fused path)."""
    return None if recorder is None else lambda probs: recorder(layer_name, probs)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, h, N, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, h*d)


class CrossAttention(nn.Module):
    """Image features (B, C, H, W) attend to text states (B, T, D_text); residual, zero-initialised.

    `layer_name` is the module path inside the UNet (set by the UNet), the name under which
    recorded attention maps are reported.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int, norm_groups: int):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        self.layer_name = "cross_attention"

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        recorder: AttentionRecorder | None = None,
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        # 1. Queries from the normalised image features, one per pixel.
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = split_heads(self.to_q(pixels), self.heads)  # (B, heads, HW, d)
        # 2. Keys and values from the text tokens.
        k = split_heads(self.to_k(context), self.heads)  # (B, heads, T, d)
        v = split_heads(self.to_v(context), self.heads)  # (B, heads, T, d)
        # 3. Attend (the explicit path only when a recorder asks for the probabilities (B, heads, HW, T)).
        out, _ = attention(q, k, v, context_mask, on_layer(recorder, self.layer_name))
        # 4. Project back and add to the residual stream.
        out = self.to_out(merge_heads(out))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class SelfAttention(nn.Module):
    """Pixels attend to each other (used at low resolution only); residual, zero-initialised.
    `layer_name`, set by the UNet, names its probabilities (B, heads, HW, HW) to a recorder."""

    def __init__(self, channels: int, head_dim: int, norm_groups: int):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        self.layer_name = "self_attention"

    def forward(self, x: torch.Tensor, recorder: AttentionRecorder | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(pixels).chunk(3, dim=-1))  # (B, h, HW, d)
        out, _ = attention(q, k, v, None, on_layer(recorder, self.layer_name))  # probs: (B, h, HW, HW)
        out = self.to_out(merge_heads(out))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class FeedForward(nn.Module):
    """Per-pixel gated MLP after attention (GEGLU, as in transformer blocks); residual, zero-initialised."""

    def __init__(self, channels: int, mult: int, norm_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.to_hidden = nn.Linear(channels, 2 * mult * channels)
        self.to_out = nn.Linear(mult * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        value, gate = self.to_hidden(pixels).chunk(2, dim=-1)  # (B, HW, mult*C) each
        out = self.to_out(value * F.gelu(gate))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)
