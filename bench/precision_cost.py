"""Seconds per default training step in fp32 and under bf16 autocast, alternating, on this machine's CPU.

One step: the configured UNet on a batch of random images and random text states, the diffusion
loss, backward, AdamW. A CPU without native bf16 emulates it, many times slower than fp32; this is
what `train.mixed_precision: auto` avoids (BENCHMARKS.md, "Mixed precision").

    python bench/precision_cost.py [--config configs/cpu.yaml] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusion.config import load_config
from diffusion.training.objective import Objective
from diffusion.training.setup import build_unet, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.config)
    width = cfg.text_encoder.tiny_clip.text_width
    torch.manual_seed(0)
    unet = build_unet(cfg, width)
    objective = Objective(cfg.train, unet)
    optimizer = torch.optim.AdamW(unet.parameters(), cfg.train.learning_rate)
    b, s, tokens = cfg.train.batch_size, cfg.data.image_size, cfg.text_encoder.tiny_clip.max_length
    images, context = torch.randn(b, 3, s, s).clamp(-1, 1), torch.randn(b, tokens, width)
    mask = torch.ones(b, tokens, dtype=torch.bool)

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective(unet, images, context, mask, grounding=None).diffusion
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    for r in range(args.rounds):
        for bf16 in (False, True) if r % 2 == 0 else (True, False):
            times[bf16].append(step(bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; auto takes: {resolve_precision('auto', torch.device('cpu'))[0]}")
    print(f"fp32 {fp32:.2f} s/step, bf16 {bf16:.2f} s/step (medians of {args.rounds}); bf16 / fp32 = {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
