"""Per-head maps: does one attention head localise its word better than the mean over heads? And what
do head maps cost?

The evaluation's single-object (22) and spatial (16) prompts, seeds 0-1, the default sampler, maps
with each head kept (`MapSettings(keep_heads=True)`, what `sample.py --head-maps` saves). Each colour
and shape word's map is scored against its object's detected mask as the evaluation scores the global
map (mIoU at half the peak, pointing), per layer: the head mean (what the layer's map is) beside every
single head, and the best head.

Cost, measured in the same run: sampling 16 prompts with and without head maps, alternating, `--rounds`
times (the median ratio); the maps.npz bytes per image written with and without them.

    PYTHONPATH=. python bench/head_maps.py --model outputs/runs/cpu
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from diffusion.evaluation.detector import DetectorSettings, detect
from diffusion.evaluation.localisation import score_map
from diffusion.evaluation.prompts import build_tasks, match_objects
from diffusion.maps.aggregate import MapSettings
from diffusion.maps.export import save_image_with_maps
from diffusion.maps.format import attn_folder
from diffusion.runs import find_model_dir, read_run_config, shapes_info
from diffusion.sampling.pipeline import TextToImagePipeline

HALF = "0.5"


def score_heads(prompts, outputs, palette) -> dict:
    """layer -> {"mean": [scores], "heads": [[scores] per head]}, each score {"iou", "pointing"}."""
    table: dict[str, dict] = {}
    for prompt, image, attention in outputs:
        found = detect(np.asarray(image), palette, DetectorSettings())
        located = match_objects(prompt, found, "binding")
        for k, obj in enumerate(prompt.objects):
            if located[k] is None:
                continue
            mask = found[located[k]].mask
            for word in (obj.words["colour"], obj.words["shape"]):
                for name, heads in attention.heads.items():
                    row = table.setdefault(name, {"mean": [], "heads": [[] for _ in heads]})
                    row["mean"].append(score_map(attention.word_maps(attention.layers[name])[word].numpy(), mask))
                    for h, maps in enumerate(heads):
                        row["heads"][h].append(score_map(attention.word_maps(maps)[word].numpy(), mask))
    return table


def summary(scores: list[dict]) -> tuple[float, float]:
    return statistics.mean(s["iou"][HALF] for s in scores), statistics.mean(s["pointing"] for s in scores)


def cost(pipe, texts, rounds) -> tuple[float, int, int]:
    """Median time ratio with/without head maps (alternating), and maps.npz bytes per image each way."""
    ratios, sizes = [], {}
    for _ in range(rounds):
        seconds = {}
        for keep in (False, True):
            start = time.perf_counter()
            out = pipe(texts, list(range(len(texts))), return_attention=True, map_settings=MapSettings(keep_heads=keep))
            seconds[keep] = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "x.png"
                save_image_with_maps(out.images[0], out.attention[0], path, {})
                sizes[keep] = (attn_folder(path) / "maps.npz").stat().st_size
        ratios.append(seconds[True] / seconds[False])
    return statistics.median(ratios), sizes[False], sizes[True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_dir = find_model_dir(args.model)
    pipe = TextToImagePipeline.from_run(model_dir)
    info, _ = shapes_info(read_run_config(model_dir), model_dir)
    palette = {c: tuple(v) for c, v in info["palette"].items()}
    tasks = {t.name: t.prompts for t in build_tasks(info)}
    prompts = tasks["single_object"] + tasks["spatial"]
    outputs = []
    for seed in range(args.seeds):
        out = pipe([p.text for p in prompts], [seed] * len(prompts), return_attention=True, map_settings=MapSettings(keep_heads=True))
        outputs += list(zip(prompts, out.images, out.attention))
    table = score_heads(prompts, outputs, palette)
    print(f"{len(outputs)} images, {len(next(iter(table.values()))['mean'])} word maps scored per layer")
    print("| layer (size) | heads | head mean: mIoU@0.5 / pointing | each head: mIoU@0.5 / pointing | best head: mIoU@0.5 / pointing |")
    print("| --- | --- | --- | --- | --- |")
    sizes = pipe.unet.cross_attention_layers
    for name, row in table.items():
        mean = summary(row["mean"])
        heads = [summary(h) for h in row["heads"]]
        best = max(heads)
        each = ", ".join(f"{m:.3f} / {p:.3f}" for m, p in heads)
        print(f"| {name} ({sizes[name]}) | {len(heads)} | {mean[0]:.3f} / {mean[1]:.3f} | {each} | {best[0]:.3f} / {best[1]:.3f} |")
    ratio, plain, with_heads = cost(pipe, [p.text for p in tasks["spatial"]], args.rounds)
    print(f"time with head maps / without: {ratio:.3f} (median of {args.rounds} alternating rounds, 16 images)")
    print(f"maps.npz per image: {plain} bytes without head maps, {with_heads} with ({with_heads / plain:.2f}x)")


if __name__ == "__main__":
    main()
