"""Relations against training steps: does the model learn "left of" with compute, and at which noise level?

For each exported model given (e.g. the marks of one long run), without layout guidance:

1. the evaluation (python -m diffusion.evaluation --layout-guidance 0): single-object fidelity, the spatial
   score, how often the relation holds where both objects are right, how often a two-object prompt gets
   exactly two objects, and the held-out compositions;
2. the first-step layout probe (bench/layout_probe.py), unguided and at the sampler's guidance;
3. the diffusion loss on the test split's relation captions per noise level (timestep buckets), with the
   true caption and with every relation replaced by its converse ("left of" -> "right of") at the same
   noise: the gap (swapped - true) is how much the prediction uses the relation at that noise level, 0
   where the model ignores it.

4. once, from the data alone, a reference for the gap of step 3 at pure noise (t = T - 1): what the relation
   is worth there to a predictor that knows only the two colours and the relation (bayes_gap).

Writes <out>.tsv (one row per model), <out>-loss.tsv (per model and bucket), <out>-bayes.json and <out>.png.

    PYTHONPATH=. python bench/relation_curve.py outputs/runs/long/model-{15,30,60,90,120}min \
        --out bench/results/relation_curve_default --seeds 2
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from layout_probe import probe, spatial_prompts

from diffusion.data.folder import CaptionedImageFolder
from diffusion.runs import find_model_dir, read_run_config, read_training_info
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.settings import SamplerSettings
from diffusion.data.relations import CONVERSE
from diffusion.training.grounding import TokenObjectTable
from diffusion.training.objective import Grounding, Objective
from diffusion.training.prepare import prepare_dataset

RELATION_PATTERN = re.compile(r"\b(" + "|".join(CONVERSE) + r")\b")


def converse_relations(caption: str) -> str:
    """Every relation phrase replaced by its converse: the caption now contradicts its image."""
    return RELATION_PATTERN.sub(lambda m: CONVERSE[m.group(1)], caption)


def evaluate(model: str, out: Path, seeds: int) -> dict:
    """The evaluation's figures without layout guidance (images reused when `out` already holds them)."""
    subprocess.run(
        [sys.executable, "-m", "diffusion.evaluation", "--model", model, "--seeds", str(seeds),
         "--layout-guidance", "0", "--no-progress", "--out", str(out)],
        check=True,
    )
    tasks = json.loads((out / "results.json").read_text())["fidelity"]["tasks"]
    spatial = tasks["spatial"]
    failed = spatial["failed_on"]
    return {
        "single_object": tasks["single_object"]["score"],
        "spatial": spatial["score"],
        "relation_holds": spatial["passed"] / max(1, spatial["passed"] + failed["relation"]),
        "exactly_two": 1 - failed["count"] / spatial["images"],
        "held_out": tasks.get("held_out", {}).get("score"),
        "three_objects": tasks.get("three_objects", {}).get("score"),
    }


def two_object_rows(data: CaptionedImageFolder) -> list[int]:
    """Rows with exactly two objects (and so the one relation between them)."""
    return [i for i, row in enumerate(data.rows) if len(row["objects"]) == 2]


def data_dirs(model: str) -> tuple[Path, Path]:
    """The (train, test) folders the model learned from (training_info.json's train_dir), else its config's."""
    cfg = read_run_config(find_model_dir(model))
    recorded = read_training_info(find_model_dir(model)).get("train_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded), Path(recorded).parent / "test"
    return prepare_dataset(cfg.data, Path(cfg.cache_dir), progress=False)


@torch.no_grad()
def loss_by_noise_level(pipe: TextToImagePipeline, model: str, buckets: int) -> list[dict]:
    """Per timestep bucket, and at pure noise (t = T - 1): the loss on the two-object test rows with their
    true captions, and the mean gap when the relation is swapped for its converse."""
    cfg = read_run_config(find_model_dir(model))
    data = CaptionedImageFolder(data_dirs(model)[1], cfg.data.image_size, masks=True, progress=False)
    picked = two_object_rows(data)
    images = data.images[picked].float() / 127.5 - 1  # (N, 3, S, S)
    captions = [data.captions[i] for i in picked]
    texts = [pipe.encode(c) for c in (captions, [converse_relations(c) for c in captions])]  # 2 x ((N, T, D), (N, T))
    # A text placer's layout for each row: the one nearest the image's masks, as training picks it.
    objects = TokenObjectTable(pipe.tokenizer, pipe.encoder.max_length)(captions, [data.word_objects[i] for i in picked])
    grounding = Grounding(objects, data.masks[picked], data.num_objects)
    objective = Objective(cfg.train, pipe.unet)
    layouts = [objective.place_loss(*text, grounding).layout for text in texts]  # 2 x (N,), or None without a placer
    scheduler = objective.scheduler  # v-prediction with zero terminal SNR: at t = T - 1 the target is -x0
    steps = scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(0)
    ranges = [(k * steps // buckets, (k + 1) * steps // buckets) for k in range(buckets)] + [(steps - 1, steps)]
    results = []
    for low, high in ranges:
        # The same timesteps and noise for both captions, so the gap is the caption's alone.
        timesteps = torch.randint(low, high, (len(picked),), generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        noisy, target = scheduler.add_noise(images, noise, timesteps), scheduler.get_velocity(images, noise, timesteps)
        losses = [
            F.mse_loss(pipe.unet(noisy, timesteps, pipe.unet.condition(*text, layout)).float(), target, reduction="none").mean(dim=(1, 2, 3))
            for text, layout in zip(texts, layouts)
        ]  # 2 x (N,)
        gap = losses[1] - losses[0]
        results.append({"timesteps": f"{low}-{high - 1}", "loss": losses[0].mean().item(),
                        "swap_gap": gap.mean().item(), "swap_worse": (gap > 0).float().mean().item()})
    return results


def relation_groups(data: CaptionedImageFolder) -> list[tuple[tuple[str, str, str], torch.Tensor]]:
    """Each two-object row as ((subject colour, reference colour, relation), its image (3, S, S) in [-1, 1])."""
    found = []
    for i in two_object_rows(data):
        row = data.rows[i]
        (rel,) = row["relations"]
        subject, reference = row["objects"][rel["subject"]], row["objects"][rel["reference"]]
        found.append(((subject["colour"], reference["colour"], rel["relation"]), data.images[i].float() / 127.5 - 1))
    return found


def bayes_gap(model: str) -> dict:
    """What the relation is worth at pure noise, from the data alone. There the v-target is -x0, so the best
    prediction for a caption is the mean image of its scenes. Estimated per (subject colour, reference colour,
    relation) from the training split's two-object rows (about 50 each) and scored on the test split's (the
    few whose groups never occur in training are skipped): the loss with the true caption's mean, the gap to
    the converse caption's mean, and the gain over the mean of the same colours in any relation (a model that
    ignores the relation words). A reference, not a bound: the model also knows shapes and sizes, and the
    group means' sampling noise (variance / ~50) inflates the loss and lowers the gain a little; it cancels
    in the swap gap, whose two means are estimated alike."""
    cfg = read_run_config(find_model_dir(model))
    train_dir, test_dir = data_dirs(model)

    sums: dict = {}
    for key, image in relation_groups(CaptionedImageFolder(train_dir, cfg.data.image_size, progress=False)):
        total, count = sums.get(key, (0, 0))
        sums[key] = (total + image, count + 1)
    mean = {key: total / count for key, (total, count) in sums.items()}  # (3, S, S) each
    scores = []
    for (a, b, relation), image in relation_groups(CaptionedImageFolder(test_dir, cfg.data.image_size, progress=False)):
        either = [(a, b, r) for r in CONVERSE if (a, b, r) in sums]
        if (a, b, relation) not in mean or (a, b, CONVERSE[relation]) not in mean:
            continue
        ignoring = sum(sums[k][0] for k in either) / sum(sums[k][1] for k in either)
        loss = [F.mse_loss(m, image).item() for m in (mean[a, b, relation], mean[a, b, CONVERSE[relation]], ignoring)]
        scores.append(loss)
    true, swapped, ignored = torch.tensor(scores).mean(dim=0).tolist()
    return {"rows": len(scores), "loss": true, "swap_gap": swapped - true, "gain_over_ignoring": ignored - true}


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, size=(560, 360)) -> Image.Image:
    """A small line chart of named (x, y) series, drawn with PIL; y from 0 to the largest value (at least 1)."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (23, 190, 207), (188, 189, 34)]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 50, 30, size[0] - 170, size[1] - 40
    xs = [x for points in series.values() for x, _ in points]
    y_max = max([1.0] + [y for points in series.values() for _, y in points])
    y_min = min([0.0] + [y for points in series.values() for _, y in points])
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y_min) / (y_max - y_min) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        y = y_min + (y_max - y_min) * i / 4
        draw.line([at(x0, y), at(x1, y)], fill=(225, 225, 225))
        draw.text((5, at(x0, y)[1] - 6), f"{y:.2f}", fill="black")
    for x in sorted(set(xs)):
        draw.text((at(x, y_min)[0] - 12, bottom + 5), f"{x:g}", fill="black")
    draw.text((left, 8), title, fill="black")
    draw.text(((left + right) // 2 - 20, bottom + 22), x_label, fill="black")
    for i, (name, points) in enumerate(series.items()):
        colour = colours[i % len(colours)]  # every series drawn, however many
        draw.line([at(x, y) for x, y in points], fill=colour, width=2)
        for x, y in points:
            px, py = at(x, y)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        legend_y = top + 16 * list(series).index(name)
        draw.line([(right + 10, legend_y + 6), (right + 30, legend_y + 6)], fill=colour, width=3)
        draw.text((right + 35, legend_y), name, fill="black")
    return image


def write(out: Path, rows: list[dict], loss_rows: list[dict], buckets: int) -> None:
    """The two tables and the plot, models sorted by step."""
    rows, loss_rows = (sorted(t, key=lambda r: r["step"]) for t in (rows, loss_rows))
    for path, table in ((out.with_suffix(".tsv"), rows), (Path(f"{out}-loss.tsv"), loss_rows)):
        keys = list(table[0])
        lines = ["\t".join(keys)] + ["\t".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) for r in table]
        path.write_text("\n".join(lines) + "\n")
    names = [n for n in ("relation_holds", "spatial", "probe_unguided", "probe_guided", "single_object", "exactly_two", "held_out", "three_objects")
             if n in rows[0]]
    accuracy = line_chart({n: [(r["step"], r[n]) for r in rows] for n in names}, "without layout guidance", "training steps")
    gaps = line_chart(
        {f"step {r['step']}": [(i, b["swap_gap"] * 1000) for i, b in enumerate(b for b in loss_rows if b["model"] == r["model"])][:buckets] for r in rows},
        "loss(converse caption) - loss(true caption), x1000", f"timestep bucket: {buckets} equal ranges of t, most noise last",
    )
    sheet = Image.new("RGB", (accuracy.width + gaps.width, max(accuracy.height, gaps.height)), "white")
    sheet.paste(accuracy, (0, 0))
    sheet.paste(gaps, (accuracy.width, 0))
    sheet.save(out.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="exported model folders (tables and plot sort them by training step)")
    parser.add_argument("--out", required=True, help="path prefix of the tables and the plot")
    parser.add_argument("--seeds", type=int, default=2, help="evaluation seeds per prompt (default 2; 0: only the probe and the loss)")
    parser.add_argument("--probe-seeds", type=int, default=8)
    parser.add_argument("--buckets", type=int, default=10, help="timestep buckets of the loss (default 10)")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bayes = bayes_gap(args.models[0])
    Path(f"{out}-bayes.json").write_text(json.dumps(bayes, indent=1) + "\n")
    print("pure noise, from the data alone:", json.dumps(bayes), flush=True)
    rows, loss_rows = [], []
    for model in args.models:
        step = read_training_info(find_model_dir(model))["step"]
        figures = {} if args.seeds == 0 else evaluate(model, Path("outputs/eval") / f"curve-{Path(model).parent.name}-{Path(model).name}", args.seeds)
        pipe, prompts = TextToImagePipeline.from_run(model), spatial_prompts(model)
        figures["probe_unguided"] = probe(pipe, prompts, args.probe_seeds, 1.0)[0]
        figures["probe_guided"] = probe(pipe, prompts, args.probe_seeds, SamplerSettings().guidance)[0]
        buckets = loss_by_noise_level(pipe, model, args.buckets)
        loss_rows += [{"model": model, "step": step, **b} for b in buckets]
        rows.append({"model": model, "step": step, **figures})
        print(json.dumps(rows[-1]), flush=True)

        write(out, rows, loss_rows, args.buckets)  # after every model, so a cut-short run keeps what it measured
    print(f"wrote {out.with_suffix('.tsv')}, {out}-loss.tsv and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
