"""Training speed of our UNet against diffusers' UNet2DConditionModel, and against the machine's peak.

Both networks get the same resolution, channel widths, attention resolutions and text width, and
a parameter count within 10% of each other; they train on the same batch with AdamW, under fp32
and under bf16 autocast. Rounds alternate between the models so machine noise hits both alike;
the figures are medians over rounds.

    python bench/unet_speed.py [--config configs/cpu.yaml] [--rounds 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from diffusion.config import load_config
from diffusion.training.setup import build_unet


def library_unet(cfg, context_dim: int) -> UNet2DConditionModel:
    """diffusers' UNet with our widths and attention placement (its blocks add a feed-forward)."""
    u = cfg.unet
    size = cfg.data.image_size
    resolutions = [size // 2**i for i in range(len(u.channel_mults))]
    has_attention = [r in u.cross_attention_resolutions for r in resolutions]
    widths = tuple(u.base_channels * m for m in u.channel_mults)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=widths,
        layers_per_block=u.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=context_dim,
        attention_head_dim=tuple(w // u.head_dim for w in widths),  # diffusers: heads per block
        norm_num_groups=u.norm_groups,
    )


class Ours(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, mask):
        return self.unet(x, t, self.unet.condition(context, mask))


class Library(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, mask):
        return self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample


def make_batch(batch: int, size: int, tokens: int, width: int):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, 12:] = False
    return (
        torch.randn(batch, 3, size, size, generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
        torch.randn(batch, tokens, width, generator=g),
        mask,
    )


def train_step(model, optimizer, batch, bf16: bool) -> None:
    x, t, context, mask = batch
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        out = model(x, t, context, mask)
    loss = (out.float() - x).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def images_per_second(model, optimizer, batch, bf16: bool, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch, bf16)
    return steps * batch[0].shape[0] / (time.perf_counter() - start)


def step_flops(model, batch) -> int:
    """Floating-point operations of one forward + backward (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        out = model(*batch)
        out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of a large square matmul in `dtype`: the machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    cfg = load_config(args.config)
    cfg.unet.text_place_layers = 0  # the UNet bodies are compared; the text placer's cost is in step_cost.py
    width = cfg.text_encoder.tiny_clip.text_width
    torch.manual_seed(0)
    models = {"ours": Ours(build_unet(cfg, width)), "diffusers": Library(library_unet(cfg, width))}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    batch = make_batch(cfg.train.batch_size, cfg.data.image_size, args.tokens, width)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    print(f"threads {torch.get_num_threads()}, batch {cfg.train.batch_size}, {cfg.data.image_size}px, "
          f"params ours {params['ours'] / 1e6:.2f}M, diffusers {params['diffusers'] / 1e6:.2f}M "
          f"(ratio {params['diffusers'] / params['ours']:.3f})")

    speeds = {(name, bf16): [] for name in models for bf16 in (False, True)}
    for name, bf16 in speeds:  # warm-up (allocator, oneDNN kernel selection)
        images_per_second(models[name], optimizers[name], batch, bf16, 2)
    for _ in range(args.rounds):
        for key in speeds:  # alternate models and precisions within every round
            speeds[key].append(images_per_second(models[key[0]], optimizers[key[0]], batch, key[1], args.steps))
    median = {key: statistics.median(v) for key, v in speeds.items()}
    for (name, bf16), value in median.items():
        print(f"{name:9s} {'bf16' if bf16 else 'fp32'}: {value:7.1f} img/s (median of {args.rounds})")
    for bf16 in (False, True):
        ratios = [o / d for o, d in zip(speeds["ours", bf16], speeds["diffusers", bf16])]
        print(f"ours / diffusers, {'bf16' if bf16 else 'fp32'}: {statistics.median(ratios):.2f}x (median of per-round ratios)")

    flops = step_flops(models["ours"], batch)
    for dtype, bf16 in ((torch.float32, False), (torch.bfloat16, True)):
        peak = matmul_peak(dtype)
        achieved = flops * median["ours", bf16] / cfg.train.batch_size
        print(f"ours {str(dtype)[6:]}: {achieved / 1e9:.1f} GFLOP/s of a {peak / 1e9:.0f} GFLOP/s matmul peak "
              f"({100 * achieved / peak:.1f}%), {flops / cfg.train.batch_size / 1e6:.0f} MFLOP per image")


if __name__ == "__main__":
    main()
