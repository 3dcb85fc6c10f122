"""Cost of the grounding loss: training steps with it against without, on real shapes batches.

Both variants train the same UNet weights (two copies) on the same batches of the configured
dataset, under the config's mixed precision, with AdamW. Rounds alternate the order of the two
variants so machine noise hits both alike; the figure is the median of per-round time ratios.

    python bench/grounding_overhead.py [--config configs/cpu.yaml] [--rounds 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from diffusion.config import load_config
from diffusion.data import CaptionedImageFolder
from diffusion.grounding import TokenObjectTable
from diffusion.objective import Grounding, diffusion_loss, make_noise_scheduler
from diffusion.prepare import prepare_dataset, prepare_text_encoder
from diffusion.text_encoder import TextEncoder
from diffusion.training import build_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="training steps per variant per round")
    args = parser.parse_args()
    torch.manual_seed(0)

    cfg = load_config(args.config)
    dirs = prepare_dataset(cfg.data, Path(cfg.cache_dir))
    encoder = TextEncoder.from_pretrained(prepare_text_encoder(cfg.text_encoder, cfg.data, Path(cfg.cache_dir), dataset_dirs=dirs))
    dataset = CaptionedImageFolder(dirs[0], cfg.data.image_size, masks=True)
    table = TokenObjectTable(encoder.tokenizer, encoder.max_length)
    batch = dataset.batch(torch.arange(cfg.train.batch_size))
    context, context_mask = encoder.encode(batch.captions)
    grounding = Grounding(table(batch.captions, batch.word_objects), batch.masks)
    scheduler = make_noise_scheduler(cfg.noise)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)

    plain_unet = build_unet(cfg, encoder.hidden_size)
    grounded_unet = copy.deepcopy(plain_unet)
    variants = {
        "plain": (plain_unet, None),
        "grounded": (grounded_unet, grounding),
    }
    optimizers = {name: torch.optim.AdamW(unet.parameters(), lr=1e-4) for name, (unet, _) in variants.items()}

    def run(name: str) -> float:
        unet, targets = variants[name]
        start = time.perf_counter()
        for _ in range(args.steps):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                terms = diffusion_loss(unet, scheduler, batch.pixels, context, context_mask, grounding=targets)
                loss = terms.diffusion if terms.grounding is None else terms.diffusion + cfg.train.grounding_weight * terms.grounding
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
        return (time.perf_counter() - start) / args.steps

    run("plain"), run("grounded")  # warm-up
    ratios, times = [], {"plain": [], "grounded": []}
    for round_index in range(args.rounds):
        order = ["plain", "grounded"] if round_index % 2 == 0 else ["grounded", "plain"]
        seconds = {name: run(name) for name in order}
        for name, value in seconds.items():
            times[name].append(value)
        ratios.append(seconds["grounded"] / seconds["plain"])
    images = cfg.train.batch_size
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:9s} median {median * 1000:.0f} ms/step  {images / median:.1f} img/s")
    print(f"grounded / plain step time: median ratio {statistics.median(ratios):.3f} over {args.rounds} rounds")


if __name__ == "__main__":
    main()
