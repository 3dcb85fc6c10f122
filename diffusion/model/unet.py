"""A small text-conditioned UNet, written by hand.

Residual blocks carry a timestep embedding; down and up paths are joined by skip connections; at
the configured feature-map sizes each block adds self-attention and/or our cross-attention to the
CLIP text states. The UNet maps (noisy image, timestep, text states) to the model output and knows
nothing of the noise schedule. Save/load comes from diffusers' ModelMixin + ConfigMixin
(`save_pretrained` writes config.json + safetensors; `from_pretrained` rebuilds from them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffusion.model.attention import AttentionRecorder, CrossAttention, FeedForward, SelfAttention
from diffusion.model.text_placer import TextPlacer


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the timestep embedding, twice; with a skip connection."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, norm_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(norm_groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.emb(emb)[:, :, None, None]  # timestep, broadcast over pixels
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetBlock(nn.Module):
    """A residual block, then optional self-attention, cross-attention and (after cross-attention,
    when ff_mult > 0) a feed-forward at this resolution."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, context_dim: int, self_attend: bool, cross_attend: bool,
        head_dim: int, norm_groups: int, ff_mult: int,
    ):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, norm_groups)
        self.self_attn = SelfAttention(out_ch, head_dim, norm_groups) if self_attend else None
        self.cross_attn = CrossAttention(out_ch, context_dim, head_dim, norm_groups) if cross_attend else None
        self.ff = FeedForward(out_ch, ff_mult, norm_groups) if cross_attend and ff_mult > 0 else None

    def forward(self, x, emb, context, context_mask, recorder=None, self_recorder=None):
        x = self.res(x, emb)
        if self.self_attn is not None:
            x = self.self_attn(x, self_recorder)
        if self.cross_attn is not None:
            x = self.cross_attn(x, context, context_mask, recorder)
        if self.ff is not None:
            x = self.ff(x)
        return x


class TextCondition(NamedTuple):
    """A batch of prompts as the UNet reads them (`UNet.condition`)."""

    states: torch.Tensor  # (B, T, D) each token's state, told where its object goes where there is a text placer
    mask: torch.Tensor | None  # (B, T) True on the prompt's tokens
    pooled: torch.Tensor | None  # (B, D) the end token's state before placement (unet.pooled_text), else None


class UNet(ModelMixin, ConfigMixin):
    """(noisy image (B, C, S, S), timestep (B,), text (TextCondition)) -> (B, C, S, S).

    Its arguments are diffusion.config.UNetConfig's fields, whose defaults are the default model's,
    plus the image size and the width of the text states."""

    @register_to_config
    def __init__(
        self,
        sample_size: int,
        context_dim: int,
        in_channels: int,
        base_channels: int,
        channel_mults: tuple[int, ...],
        num_res_blocks: int,
        cross_attention_resolutions: tuple[int, ...],
        self_attention_resolutions: tuple[int, ...],
        head_dim: int,
        norm_groups: int,
        ff_mult: int,
        pooled_text: bool,
        text_place_layers: int,
        text_place_width: int,
        text_place_layouts: int,
    ):
        super().__init__()
        resolutions = [sample_size // 2**i for i in range(len(channel_mults))]
        check_attention_resolutions(resolutions, cross_attention_resolutions, self_attention_resolutions)
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Global text condition (as SDXL adds CLIP's pooled output to the timestep embedding): the end
        # token's state, which has read the whole prompt. Token states alone cannot tell "a red circle
        # left of a blue square" from the start of a longer caption; the end token can.
        self.text_mlp = (
            nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) if pooled_text else None
        )
        # Each token's predicted object centre, added to its state (diffusion.model.text_placer);
        # its context is each token's last state beside its input embedding, (B, T, 2D).
        self.placer = (
            TextPlacer(context_dim, text_place_layers, text_place_width, min(head_dim, text_place_width), text_place_layouts)
            if text_place_layers
            else None
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(in_ch: int, out_ch: int, res: int) -> UNetBlock:
            return UNetBlock(
                in_ch, out_ch, emb_dim, context_dim, res in self_attention_resolutions,
                res in cross_attention_resolutions, head_dim, norm_groups, ff_mult,
            )

        widths = [base_channels * m for m in channel_mults]
        ch = self.build_paths(widths, resolutions, num_res_blocks, block)
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        self.initialize_weights()
        for name, module in self.named_modules():
            if isinstance(module, (CrossAttention, SelfAttention)):
                module.layer_name = name

    def build_paths(self, widths: list[int], resolutions: list[int], num_res_blocks: int, block) -> int:
        """The down path, the middle and the up path of `block(in, out, resolution)`s; returns the last width."""
        # Down path: num_res_blocks blocks per level, then a strided conv (not after the last level).
        ch = self.conv_in.out_channels
        skip_widths = [ch]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, (width, res) in enumerate(zip(widths, resolutions)):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(block(ch, width, res))
                ch = width
                skip_widths.append(ch)
            self.down.append(blocks)
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skip_widths.append(ch)

        # Middle: attention at the lowest resolution, between two residual blocks.
        self.mid = nn.ModuleList([block(ch, ch, resolutions[-1]), block(ch, ch, -1)])

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip, then nearest upsampling.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skip_widths.pop(), widths[level], resolutions[level]))
                ch = widths[level]
            self.up.append(blocks)
            self.upsample.append(nn.Identity() if level == 0 else nn.Conv2d(ch, ch, 3, padding=1))
        return ch

    def initialize_weights(self) -> None:
        """PyTorch defaults everywhere, but every residual branch and the output start at zero,
        so the untrained network is the identity on its residual stream."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
            if isinstance(module, (CrossAttention, SelfAttention, FeedForward)):
                nn.init.zeros_(module.to_out.weight)
                nn.init.zeros_(module.to_out.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if self.text_mlp is not None:
            nn.init.zeros_(self.text_mlp[-1].weight)
            nn.init.zeros_(self.text_mlp[-1].bias)

    @property
    def cross_attention_layers(self) -> dict[str, int]:
        """Name (module path) -> feature-map size of every cross-attention layer, in forward order."""
        sizes = {}
        for name, module in self.named_modules():
            if isinstance(module, CrossAttention):
                sizes[name] = self._resolution_of(name)
        return sizes

    def _resolution_of(self, name: str) -> int:
        part, index = name.split(".")[:2]
        levels = len(self.config.channel_mults)
        level = {"down": int(index), "mid": levels - 1, "up": levels - 1 - int(index)}[part]
        return self.config.sample_size // 2**level

    def condition(
        self, states: torch.Tensor, mask: torch.Tensor | None, layout: torch.Tensor | None = None,
        centres: torch.Tensor | None = None,
    ) -> TextCondition:
        """Text states (B, T, D) and their mask (B, T) -> what the blocks read: the pooled end token and,
        with a text placer, each token's state told where its object goes in layout `layout` (B,) of the
        placer's proposals (None: the first); `centres` (B, T, K, 2): the proposals, where the caller has them."""
        pooled = end_token_states(states, mask) if self.text_mlp is not None else None  # (B, D)
        if self.placer is not None:
            states = self.placer(states, mask, layout, centres)  # (B, T, D)
        return TextCondition(states, mask, pooled)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: TextCondition, recorder: AttentionRecorder | None = None,
        self_recorder: AttentionRecorder | None = None,
    ) -> torch.Tensor:
        """`recorder` reads (and may replace) every cross-attention layer's probabilities (B, heads, HW, T),
        `self_recorder` every self-attention layer's (B, heads, HW, HW); None: the fused path."""
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        context, context_mask = text.states, text.mask
        # 1. The timestep embedding (plus, if configured, the pooled text) shared by all residual blocks.
        emb = self.time_mlp(timestep_embedding(timestep, self.config.base_channels))  # (B, 4C)
        if self.text_mlp is not None:
            emb = emb + self.text_mlp(text.pooled)  # (B, 4C)
        # 2. Down path, remembering a skip after every block and downsampling.
        h = self.conv_in(sample)  # (B, C, S, S)
        skips = [h]
        for blocks, downsample in zip(self.down, self.downsample):
            for blk in blocks:
                h = blk(h, emb, context, context_mask, recorder, self_recorder)
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)
        # 3. Middle at the lowest resolution.
        for blk in self.mid:
            h = blk(h, emb, context, context_mask, recorder, self_recorder)
        # 4. Up path, concatenating the skips in reverse order.
        for blocks, upsample in zip(self.up, self.upsample):
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask, recorder, self_recorder)
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        # 5. Back to image channels.
        return self.conv_out(F.silu(self.norm_out(h)))


def end_token_states(context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) text states -> (B, D): each prompt's last unmasked token, CLIP's end token."""
    if context_mask is None:
        return context[:, -1]
    last = context_mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
    return context[torch.arange(context.shape[0], device=context.device), last]


def check_attention_resolutions(resolutions: list[int], cross: tuple[int, ...], self_: tuple[int, ...]) -> None:
    """Every asked-for attention resolution must be one the UNet has."""
    for kind, asked in (("cross_attention_resolutions", cross), ("self_attention_resolutions", self_)):
        missing = sorted(set(asked) - set(resolutions))
        if missing:
            raise ValueError(
                f"unet.{kind} asks for {missing}, but this UNet's feature maps are {resolutions} pixels wide "
                f"(image size halved at each of {len(resolutions)} levels); choose from {resolutions}"
            )
