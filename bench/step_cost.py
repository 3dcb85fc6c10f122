"""Cost per training step of the optional losses and of fine-tuning the text tower, on real shapes batches.

Four variants train on the same batch of the configured dataset, under the config's mixed
precision, with AdamW: "plain" (diffusion loss, frozen text states), "grounded" (+ the grounding
loss) and "tuned" (+ the text tower fine-tuned: its states recomputed with gradients every step),
copies of the same UNet weights without a text placer; and "placed" (+ the text placer of
`unet.text_place_layers`, reading input embeddings beside the last states, with its place loss). Rounds rotate the order of the variants so machine noise hits all
alike; the figures are medians of per-round time ratios.

    python bench/step_cost.py [--config configs/cpu.yaml] [--rounds 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from diffusion.config import load_config
from diffusion.data.folder import CaptionedImageFolder
from diffusion.training.grounding import TokenObjectTable
from diffusion.training.objective import Grounding, Objective
from diffusion.training.prepare import prepare_dataset, prepare_text_encoder
from diffusion.training.text_states import TextStateCache, TunedTextStates
from diffusion.text.encoder import TextEncoder
from diffusion.training.setup import build_unet, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="training steps per variant per round")
    args = parser.parse_args()
    torch.manual_seed(0)

    cfg = load_config(args.config)
    dirs = prepare_dataset(cfg.data, Path(cfg.cache_dir))
    source = prepare_text_encoder(cfg.text_encoder, cfg.data, Path(cfg.cache_dir), dataset_dirs=dirs)
    encoder = TextEncoder.from_pretrained(source)
    dataset = CaptionedImageFolder(dirs[0], cfg.data.image_size, masks=True)
    table = TokenObjectTable(encoder.tokenizer, encoder.max_length)
    batch = dataset.batch(torch.arange(cfg.train.batch_size))
    frozen_states = TextStateCache(encoder, batch.captions, progress=False)
    tuned_tower = copy.deepcopy(encoder.model).requires_grad_(True)
    tuned_states = TunedTextStates(encoder, batch.captions, tuned_tower)
    placed_tower = copy.deepcopy(encoder.model).requires_grad_(True)
    with_embeddings = TextEncoder(encoder.tokenizer, placed_tower, input_embeddings=True)
    placed_states = TunedTextStates(with_embeddings, batch.captions, placed_tower)  # (B, T, 2D)
    rows = frozen_states.rows(batch.captions)
    grounding = Grounding(table(batch.captions, batch.word_objects), batch.masks, dataset.num_objects)
    precision, _ = resolve_precision(cfg.train.mixed_precision, torch.device("cpu"))  # as training on this CPU resolves it
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    layers = cfg.unet.text_place_layers or 2
    cfg.unet.text_place_layers = 0
    unet = build_unet(cfg, encoder.hidden_size)
    cfg.unet.text_place_layers = layers
    variants = {  # name -> (UNet, text states, grounding targets, tuned tower)
        "plain": (unet, frozen_states, None, None),
        "grounded": (copy.deepcopy(unet), frozen_states, grounding, None),
        "tuned": (copy.deepcopy(unet), tuned_states, grounding, tuned_tower),
        "placed": (build_unet(cfg, with_embeddings.width), placed_states, grounding, placed_tower),
    }
    objectives = {name: Objective(cfg.train, model) for name, (model, _, _, _) in variants.items()}
    optimizers = {
        name: torch.optim.AdamW([*model.parameters(), *(tower.parameters() if tower is not None else [])], lr=1e-4)
        for name, (model, _, _, tower) in variants.items()
    }

    def run(name: str) -> float:
        model, states, targets, _ = variants[name]
        start = time.perf_counter()
        for _ in range(args.steps):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                context, context_mask = states.lookup(rows)  # (B, T, D), (B, T)
                loss = objectives[name](model, batch.pixels, context, context_mask, targets).total
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
        return (time.perf_counter() - start) / args.steps

    names = list(variants)
    for name in names:  # warm-up
        run(name)
    times = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            times[name].append(run(name))
    images = cfg.train.batch_size
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:9s} median {median * 1000:.0f} ms/step  {images / median:.1f} img/s")
    for name, base in (("grounded", "plain"), ("tuned", "grounded"), ("placed", "tuned")):
        ratios = [a / b for a, b in zip(times[name], times[base])]
        print(f"{name} / {base} step time: median ratio {statistics.median(ratios):.3f} over {args.rounds} rounds")


if __name__ == "__main__":
    main()
