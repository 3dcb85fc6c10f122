"""Does the model follow the prompt, and do its attention maps point at the right object?

    python -m diffusion.evaluate --model outputs/runs/cpu
    python -m diffusion.evaluate --model outputs/runs/cpu --seeds 8 --scheduler ddpm --steps 100 --out outputs/eval/cpu
    python -m diffusion.evaluate --model outputs/runs/cpu --quick          # a handful of prompts, 2 seeds
    python -m diffusion.evaluate --model outputs/runs/mine --masks masks.jsonl   # a model of your own data

Prompt fidelity (in the manner of GenEval; shapes models only): the prompts of
`diffusion.eval_prompts` are sampled with several seeds, `diffusion.detector` finds the objects in
each image, and an image passes a task when every clause the task grades holds. A task's score is
its fraction of passing images; "overall" is the mean over the distinct prompt sets on trained
compositions (single objects, pairs, sizes; each graded on all its clauses, so no image counts
twice), and the held-out compositions are reported beside it. The colour, shape, two_objects and
colour_binding rows grade the same images on fewer clauses and are shown, not averaged.

Attention localisation (in the manner of DAAM): the sampler writes each image's word maps
(`<name>.attn/maps.npz`, `manifest.json`), which are read back; each colour and shape word's map,
divided by its maximum and thresholded, is compared with the mask of the object the detector
found for that word (IoU), and its maximum should lie inside that object (pointing game). Two
baselines sit in the same table: a uniform map, and the map of the same kind of word of the OTHER
object of a two-object prompt ("swapped"). With --masks the masks come from the user instead:
JSONL rows {"prompt": ..., "seed": 0, "masks": {"word": "mask.png"}} (mask pixels > 127 are the
object; paths relative to the JSONL file).

Everything goes to --out (default outputs/eval/<run name>/): samples/ (images and maps),
results.json, results.md and failures.png (failed images, each with its reasons).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffusion.sampler_defaults import add_sampler_arguments, check_sampler_arguments, sampler_settings
from diffusion.errors import UserError, exit_on_user_error

THRESHOLD = 0.5  # a word's map, divided by its maximum, marks the pixels where it is >= this
THRESHOLD_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)
MAX_FAILURE_TILES = 60
TILE_SCALE = 4  # failure tiles show images at this many screen pixels per image pixel
TILE_WIDTH = 200
MASK_LEVEL = 127  # user mask pixels above this grey level are the object


# ---------------------------------------------------------------------------------------------
# The model and its data
# ---------------------------------------------------------------------------------------------


def run_name(model_dir: Path) -> str:
    return model_dir.parent.name if model_dir.name == "model" else model_dir.name


def read_run_config(model_dir: Path):
    """The resolved training config saved with the export (model/config.yaml)."""
    from diffusion.config import ConfigError, load_config

    path = model_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.yaml, so what data the model was trained on is unknown")
    try:
        return load_config(path)
    except ConfigError as error:
        raise UserError(f"{path}: {error}") from None


def shapes_info(cfg) -> tuple[dict, str]:
    """The dataset's dataset_info.json (held-out pairs and relations, palette, config), and where it came from.

    Read from the cached dataset when it is there; otherwise rebuilt from the run's config, which
    defines the dataset completely (only the held-out row count is then unknown).
    """
    from diffusion.prepare import shapes_dir
    from diffusion.shapes import dataset_info

    path = shapes_dir(cfg.data, Path(cfg.cache_dir)) / "dataset_info.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    return dataset_info(cfg.data.shapes, num_test_held_out=None), "rebuilt from the run's config (no cached dataset found)"


# ---------------------------------------------------------------------------------------------
# Sampling, and reading the maps back
# ---------------------------------------------------------------------------------------------


def sample_missing(pipe_loader, jobs, samples_dir: Path, args, model_dir: Path) -> tuple[int, int]:
    """Sample the jobs whose image and maps are not in samples_dir yet; (sampled, reused).

    An image already there is reused when its manifest records the same model (path and training
    step), scheduler, steps, guidance scale, rescale and layout guidance; one made with other settings
    stops the evaluation unless --overwrite.
    """
    from diffusion.attention_maps import MapSettings
    from diffusion.generate import generate

    names = [j.file_name for j in jobs]
    if len(set(names)) != len(names):
        raise UserError("two prompts map to the same file name; make them differ in their first 60 characters")
    settings = {"model": str(model_dir.resolve()), **sampler_settings(args)}
    info = model_dir / "training_info.json"
    if info.is_file():  # a re-exported model at the same path has another step
        settings["model_step"] = json.loads(info.read_text()).get("step")
    todo = []
    for job in jobs:
        manifest = (samples_dir / job.file_name).with_suffix(".attn") / "manifest.json"
        if args.overwrite or not manifest.is_file() or not (samples_dir / job.file_name).is_file():
            todo.append(job)
            continue
        recorded = json.loads(manifest.read_text())
        # Manifests written before --guidance-rescale or --layout-guidance existed lack them: made without.
        recorded.setdefault("guidance_rescale", 0.0)
        recorded.setdefault("layout_guidance", 0.0)
        if any(recorded.get(k) != v for k, v in settings.items()):
            raise UserError(
                f"{samples_dir} holds {job.file_name} made with other settings "
                f"({ {k: recorded.get(k) for k in settings} }); pass --overwrite to resample or choose another --out"
            )
    if todo:
        pipe = pipe_loader()
        pipe.use_scheduler(args.scheduler)
        generate(
            pipe, todo, samples_dir, args.batch_size, args.steps, args.guidance, maps=MapSettings(keep_layers=False),
            extra_manifest={**settings, "negative_prompt": ""}, progress=not args.no_progress,
            guidance_rescale=args.guidance_rescale, layout_guidance=args.layout_guidance,
        )
    return len(todo), len(jobs) - len(todo)


def read_maps(image_path: Path) -> tuple[list[str], np.ndarray]:
    """(words, maps (W, S, S)) from the export beside an image: <name>.attn/manifest.json + maps.npz."""
    folder = image_path.with_suffix(".attn")
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(folder / manifest["arrays"]["file"]) as arrays:
        words = arrays["words"]
    if len(words) != len(manifest["words"]):
        raise ValueError(f"{folder}: maps.npz holds {len(words)} word maps for {len(manifest['words'])} words")
    return manifest["words"], words


def read_image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Localisation metrics
# ---------------------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def score_map(heat: np.ndarray, mask: np.ndarray) -> dict:
    """IoU at every sweep threshold and the pointing game for one map (S, S) against one object mask."""
    peak = heat.max()
    normalised = heat / peak if peak > 0 else heat
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return {
        "iou": {f"{t:.1f}": iou(normalised >= t, mask) for t in THRESHOLD_SWEEP},
        "pointing": float(mask[y, x]),
        "coverage": float((normalised >= THRESHOLD).mean()),  # how much of the image the thresholded map marks
    }


def score_uniform(mask: np.ndarray) -> dict:
    """A uniform map: every threshold keeps the whole image; its maximum is anywhere (chance = area)."""
    chance = float(mask.mean())
    return {"iou": {f"{t:.1f}": chance for t in THRESHOLD_SWEEP}, "pointing": chance, "coverage": 1.0}


def summarise(scores: list[dict]) -> dict:
    if not scores:
        return {"n": 0, "miou": {f"{t:.1f}": None for t in THRESHOLD_SWEEP}, "pointing": None, "coverage": None}
    return {
        "n": len(scores),
        "miou": {k: float(np.mean([s["iou"][k] for s in scores])) for k in scores[0]["iou"]},
        "pointing": float(np.mean([s["pointing"] for s in scores])),
        "coverage": float(np.mean([s["coverage"] for s in scores])),
    }


class LocalisationTable:
    """Scores collected per word type and per map kind (own, own on two-object prompts, swapped, uniform)."""

    KINDS = ("own", "own_two_objects", "swapped", "uniform")

    def __init__(self, word_types: tuple[str, ...]):
        self.scores: dict[str, dict[str, list[dict]]] = {w: {k: [] for k in self.KINDS} for w in word_types}

    def add(self, word_type: str, kind: str, score: dict) -> None:
        self.scores[word_type][kind].append(score)

    def summary(self) -> dict:
        return {w: {k: summarise(v) for k, v in kinds.items()} for w, kinds in self.scores.items()}


def localise_shapes(records: list[dict], table: LocalisationTable) -> dict:
    """Score each colour and shape word's map against its object's detected mask; counts of what was left out."""
    counts = {"objects": 0, "scored": 0, "object_not_found": 0, "word_not_in_maps": 0}
    for record in records:
        prompt, detections, matched = record["prompt"], record["detections"], record["located"]
        words, maps = read_maps(record["path"])
        for k, obj in enumerate(prompt.objects):
            counts["objects"] += 1
            if matched[k] is None:
                counts["object_not_found"] += 1
                continue
            mask = detections[matched[k]].mask
            if mask.shape != maps.shape[1:]:
                raise ValueError(f"{record['path']}: maps are {maps.shape[1:]} but the image is {mask.shape}")
            if any(i >= len(words) or words[i] != getattr(obj, t) for t, i in obj.words.items() if t != "size"):
                counts["word_not_in_maps"] += 1
                continue
            counts["scored"] += 1
            for word_type in ("colour", "shape"):
                own = score_map(maps[obj.words[word_type]], mask)
                table.add(word_type, "own", own)
                table.add(word_type, "uniform", score_uniform(mask))
                if len(prompt.objects) == 2:
                    other = prompt.objects[1 - k]
                    table.add(word_type, "own_two_objects", own)
                    table.add(word_type, "swapped", score_map(maps[other.words[word_type]], mask))
    return counts


def read_masks_file(path: Path) -> list[dict]:
    """Rows {"prompt", "seed", "masks": {word: mask path}} with checks that name the row."""
    if not path.is_file():
        raise UserError(f"--masks {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--masks {path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not JSON ({error})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f'{where}: expected {{"prompt": "...", "seed": 0, "masks": {{"word": "mask.png"}}}}')
        if not isinstance(row.get("seed", 0), int) or not isinstance(row.get("masks"), dict) or not row["masks"]:
            raise UserError(f'{where}: "seed" must be an integer and "masks" a non-empty mapping word -> mask file')
        masks = {}
        for word, file in row["masks"].items():
            mask_path = Path(file) if Path(file).is_absolute() else path.parent / file
            if not mask_path.is_file():
                raise UserError(f"{where}: the mask for {word!r}, {mask_path}, does not exist")
            masks[word] = mask_path
        rows.append({"prompt": row["prompt"], "seed": int(row.get("seed", 0)), "masks": masks, "line": number})
    if not rows:
        raise UserError(f"--masks {path} holds no rows")
    return rows


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    image = Image.open(path).convert("L")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(image) > MASK_LEVEL


def localise_user_masks(rows: list[dict], samples_dir: Path, table: LocalisationTable) -> dict:
    """Score each masked word's map against the user's mask; the swapped baseline uses another masked word."""
    from diffusion.generate import Job

    counts = {"objects": 0, "scored": 0, "word_not_in_prompt": 0, "empty_mask": 0}
    problems = []
    for row in rows:
        words, maps = read_maps(samples_dir / Job(row["prompt"], row["seed"]).file_name)
        lowered = [w.lower() for w in words]
        index, masks = {}, {}
        for word, mask_path in row["masks"].items():
            counts["objects"] += 1
            if word.lower() not in lowered:
                counts["word_not_in_prompt"] += 1
                problems.append(f"line {row['line']}: {word!r} is not a word of {row['prompt']!r} (words: {words})")
                continue
            mask = load_mask(mask_path, maps.shape[1:])
            if not mask.any():
                counts["empty_mask"] += 1
                problems.append(f"line {row['line']}: the mask of {word!r} ({mask_path}) is empty")
                continue
            index[word], masks[word] = lowered.index(word.lower()), mask
        for word, mask in masks.items():
            counts["scored"] += 1
            own = score_map(maps[index[word]], mask)
            table.add("word", "own", own)
            table.add("word", "uniform", score_uniform(mask))
            others = [w for w in masks if w != word]
            if others:
                table.add("word", "own_two_objects", own)
                table.add("word", "swapped", score_map(maps[index[others[0]]], mask))
    return {**counts, "problems": problems}


def localisation_section(source: str, table: LocalisationTable, counts: dict) -> dict:
    return {
        "source": source,
        "threshold": THRESHOLD,
        "thresholds": list(THRESHOLD_SWEEP),
        "normalisation": "each word map divided by its own maximum",
        "map": "the global word map: mean over cross-attention layers (upsampled) and denoising steps",
        "table": table.summary(),
        "counts": counts,
    }


# ---------------------------------------------------------------------------------------------
# Prompt fidelity
# ---------------------------------------------------------------------------------------------


def evaluate_fidelity(tasks, records: list[dict]) -> dict:
    """Grade every image under every task that uses its prompt; per-task and overall scores."""
    from diffusion.eval_prompts import ASPECTS, check

    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt"].text, []).append(record)
    out = {}
    for task in tasks:
        results, per_prompt, failed_clauses = [], [], {"count": 0, "object": 0, "relation": 0}
        for prompt in task.prompts:
            images = []
            for record in by_prompt[prompt.text]:
                verdict = check(prompt, record["detections"], task.aspect)
                record.setdefault("verdicts", {})[task.name] = {"passed": verdict.passed, "reason": verdict.reason}
                images.append(verdict.passed)
                failed_clauses[verdict.clause] = failed_clauses.get(verdict.clause, 0) + (not verdict.passed)
            results.extend(images)
            per_prompt.append(
                {"prompt": prompt.text, "passed": int(sum(images)), "images": len(images), "held_out": list(prompt.held_out)}
            )
        entry = {
            "description": task.description,
            "grades": ASPECTS[task.aspect],
            "score": float(np.mean(results)),
            "passed": int(sum(results)),
            "images": len(results),
            "failed_on": {k: v for k, v in failed_clauses.items() if k},
            "prompts": per_prompt,
        }
        if task.name == "held_out":
            for kind in ("pair", "relation"):
                kept = [p for p in per_prompt if any(h.startswith(kind) for h in p["held_out"])]
                n = sum(p["images"] for p in kept)
                entry[f"score_{kind}s"] = sum(p["passed"] for p in kept) / n if n else None
        out[task.name] = entry
    # Several tasks grade the same images on fewer clauses (colour and shape grade single_object's
    # images; two_objects and colour_binding grade spatial's). The overall counts each distinct prompt
    # set once, by its task that grades every clause (aspect "all"), as GenEval's distinct sets do.
    distinct = [t.name for t in tasks if t.aspect == "all" and t.name != "held_out"]
    return {
        "applies": True,
        "tasks": out,
        "confusion": confusion(tasks, records),
        "overall": float(np.mean([out[name]["score"] for name in distinct])),
        "overall_over": distinct,
        "rows": [name for name in out if name != "held_out"],
    }


def confusion(tasks, records: list[dict]) -> dict:
    """On single-object prompts whose image shows exactly one object: asked -> drawn, for colour and shape."""
    single = {p.text for t in tasks if t.name == "single_object" for p in t.prompts}
    table = {"colour": {}, "shape": {}, "images": 0, "images_with_one_object": 0}
    for record in records:
        if record["prompt"].text not in single:
            continue
        table["images"] += 1
        if len(record["detections"]) != 1:
            continue
        table["images_with_one_object"] += 1
        (asked,), (drawn,) = record["prompt"].objects, record["detections"]
        for key in ("colour", "shape"):
            row = table[key].setdefault(getattr(asked, key), {})
            row[getattr(drawn, key)] = row.get(getattr(drawn, key), 0) + 1
    return table


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"# Evaluation of {results['run_name']}",
        "",
        f"Model `{results['model']}`; {s['seeds']} seed(s) per prompt, {s['steps']} {s['scheduler']} steps, "
        f"guidance {s['guidance']}"
        + (f" rescaled {s['guidance_rescale']}" if s.get("guidance_rescale") else "")
        + (f", layout guidance {s['layout_guidance']}" if s.get("layout_guidance") else "")
        + (" (quick)" if s["quick"] else "") + f"; {results['images']} images.",
        "",
        "## Prompt fidelity",
        "",
    ]
    fidelity = results["fidelity"]
    if not fidelity["applies"]:
        lines += [fidelity["message"], ""]
    else:
        lines += [
            "| task | grades | score | passed / images | failed on: count / object / relation |",
            "| --- | --- | --- | --- | --- |",
        ]
        tasks = fidelity["tasks"]
        for name in fidelity["rows"]:
            t = tasks[name]
            part = "" if name in fidelity["overall_over"] else " (clause of a set above)"
            lines.append(f"| {name}{part} | {t['grades']} | {t['score']:.3f} | {t['passed']} / {t['images']} | {failed_on(t)} |")
        over = ", ".join(fidelity["overall_over"])
        lines.append(f"| **overall** | mean over the distinct prompt sets ({over}) | **{fidelity['overall']:.3f}** | | |")
        if "held_out" in tasks:
            t = tasks["held_out"]
            lines.append(
                f"| held_out | compositions never in the training captions (pairs {fmt(t.get('score_pairs'))}, "
                f"relations {fmt(t.get('score_relations'))}) | {t['score']:.3f} | {t['passed']} / {t['images']} "
                f"| {failed_on(t)} |"
            )
        lines += [
            "",
            f"An image passes when it holds exactly the prompt's number of objects and every graded clause holds; "
            f"a relation holds when the centres differ by at least {s['relation_margin_px']} px in the stated "
            f"direction. A size word is graded only where the prompt has one. Failed images (up to {MAX_FAILURE_TILES}, "
            "seed 0 of every prompt first): failures.png.",
            "",
        ]
        lines += confusion_markdown(fidelity["confusion"])
    lines += ["## Attention localisation", ""]
    for section in results["localisation"]:
        lines += localisation_markdown(section)
    return "\n".join(lines) + "\n"


def failed_on(task: dict) -> str:
    return " / ".join(str(task["failed_on"][k]) for k in ("count", "object", "relation"))


def confusion_markdown(table: dict) -> list[str]:
    lines = [
        f"Single-object prompts, asked -> drawn, on the {table['images_with_one_object']} of {table['images']} images "
        "that show exactly one object:",
        "",
    ]
    for key in ("colour", "shape"):
        drawn = sorted({d for row in table[key].values() for d in row})
        lines += [f"| {key}: asked (row), drawn (column) | " + " | ".join(drawn) + " |", "| --- |" + " --- |" * len(drawn)]
        for asked, row in sorted(table[key].items()):
            lines.append(f"| {asked} | " + " | ".join(str(row.get(d, 0)) for d in drawn) + " |")
        lines.append("")
    return lines


def localisation_markdown(loc: dict) -> list[str]:
    t = f"{THRESHOLD:.1f}"
    lines = [
        f"Masks from {loc['source']}. Each word's map ({loc['map']}) is divided by its own maximum "
        f"and thresholded at {THRESHOLD} for the IoU; pointing: the map's maximum lies inside the object.",
        "",
        f"| word | map | mIoU@{t} | pointing | image area marked@{t} | instances |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    names = {
        "own": "its own map",
        "own_two_objects": "its own map, two-object prompts",
        "swapped": "baseline: the other object's word",
        "uniform": "baseline: uniform map",
    }
    for word_type, kinds in loc["table"].items():
        for kind, summary in kinds.items():
            lines.append(
                f"| {word_type} | {names[kind]} | {fmt(summary['miou'][t])} | {fmt(summary['pointing'])} "
                f"| {fmt(summary['coverage'])} | {summary['n']} |"
            )
    lines += ["", "mIoU over thresholds:", "", "| word | map | " + " | ".join(f"{x:.1f}" for x in THRESHOLD_SWEEP) + " |"]
    lines.append("| --- | --- |" + " --- |" * len(THRESHOLD_SWEEP))
    for word_type, kinds in loc["table"].items():
        for kind in ("own", "swapped"):
            values = " | ".join(fmt(kinds[kind]["miou"][f"{x:.1f}"]) for x in THRESHOLD_SWEEP)
            lines.append(f"| {word_type} | {names[kind]} | {values} |")
    counts = loc["counts"]
    skipped = {k: v for k, v in counts.items() if k not in ("objects", "scored", "problems")}
    left_out = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in skipped.items())
    lines += ["", f"Objects named: {counts['objects']}; scored: {counts['scored']}; left out: {left_out}.", ""]
    if not counts["scored"]:
        lines += ["No object could be scored, so the table is empty (n/a).", ""]
    return lines


def failure_grid(records: list[dict], path: Path) -> int:
    """A grid of failed images (detections boxed) with each failed task's reason; returns how many tiles."""
    failed = [r for r in records if any(not v["passed"] for v in r.get("verdicts", {}).values())]
    failed.sort(key=lambda r: r["seed"])  # stable: seed 0's failures, then seed 1's...: spread over prompts
    tiles = []
    for record in failed[:MAX_FAILURE_TILES]:
        image = Image.open(record["path"]).convert("RGB")
        side = TILE_WIDTH - 8
        picture = image.resize((side, side), Image.NEAREST)
        draw = ImageDraw.Draw(picture)
        scale = side / image.width
        for d in record["detections"]:
            x0, y0, x1, y1 = (v * scale for v in d.bbox)
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 0, 0))
        reasons = {}
        for task, verdict in record["verdicts"].items():
            if not verdict["passed"]:
                reasons.setdefault(verdict["reason"], []).append(task)
        text = [f"{record['prompt'].text} (seed {record['seed']})"]
        text += [f"{', '.join(tasks)}: {reason}" for reason, tasks in reasons.items()]
        wrapped = [w for line in text for w in textwrap.wrap(line, 32)]
        tile = Image.new("RGB", (TILE_WIDTH, side + 8 + 12 * len(wrapped)), "white")
        tile.paste(picture, (4, 4))
        ImageDraw.Draw(tile).multiline_text((4, side + 6), "\n".join(wrapped), fill=(0, 0, 0), spacing=2)
        tiles.append(tile)
    if not tiles:
        if path.exists():
            path.unlink()
        return 0
    columns = min(6, len(tiles))
    rows = [tiles[i : i + columns] for i in range(0, len(tiles), columns)]
    heights = [max(t.height for t in row) for row in rows]
    grid = Image.new("RGB", (columns * TILE_WIDTH, sum(heights)), (200, 200, 200))
    top = 0
    for row, height in zip(rows, heights):
        for i, tile in enumerate(row):
            grid.paste(tile, (i * TILE_WIDTH, top))
        top += height
    grid.save(path)
    return len(tiles)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a run folder (outputs/runs/<name>) or an exported model folder")
    parser.add_argument("--out", help="output folder (default outputs/eval/<run name>)")
    parser.add_argument("--seeds", type=int, help="seeds per prompt, 0..N-1 (default 4; 2 with --quick)")
    add_sampler_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="a handful of prompts per task (for tests)")
    parser.add_argument("--masks", help="JSONL of {prompt, seed, masks: {word: mask.png}} for attention localisation")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--overwrite", action="store_true", help="resample images already in the output folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 4
    if args.seeds < 1 or args.batch_size < 1:
        raise UserError("--seeds and --batch-size must be at least 1")
    check_sampler_arguments(args)
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation the arguments ask for; write the reports and return results.json's content."""
    from diffusion.detector import DetectorSettings, detect
    from diffusion.eval_prompts import RELATION_MARGIN_PX, build_tasks, match_objects
    from diffusion.generate import Job
    from diffusion.pipeline import TextToImagePipeline, find_model_dir

    model_dir = find_model_dir(args.model)
    cfg = read_run_config(model_dir)
    is_shapes = cfg.data.dataset == "shapes"
    rows = read_masks_file(Path(args.masks)) if args.masks else None
    if not is_shapes and rows is None:
        raise UserError(
            f"{model_dir} was trained on {cfg.data.dataset}, not the built-in shapes dataset: prompt fidelity applies "
            "to the shapes domain only, and attention localisation needs the objects' masks. Pass --masks FILE, a "
            'JSONL with rows {"prompt": "a dog on a sofa", "seed": 0, "masks": {"dog": "masks/dog0.png"}}'
        )
    out_dir = Path(args.out) if args.out else Path("outputs/eval") / run_name(model_dir)
    samples_dir = out_dir / "samples"
    seeds = list(range(args.seeds))
    detector = DetectorSettings()

    # 1. Plan the images: the shapes prompts with every seed, and the user's (prompt, seed) rows.
    tasks, info, info_source = [], None, None
    if is_shapes:
        info, info_source = shapes_info(cfg)
        tasks = build_tasks(info, quick=args.quick)
    prompts = {p.text: p for task in tasks for p in task.prompts}
    jobs = [Job(text, seed) for text in prompts for seed in seeds]
    if rows is not None:
        jobs += [job for job in dict.fromkeys(Job(r["prompt"], r["seed"]) for r in rows) if job not in jobs]

    # 2. Sample what is missing, with maps.
    def load_pipe():
        return TextToImagePipeline.from_run(model_dir, device=args.device)

    sampled, reused = sample_missing(load_pipe, jobs, samples_dir, args, model_dir)
    print(f"{sampled} image(s) sampled, {reused} reused, in {samples_dir}")

    # 3. Detect the objects of every shapes image; grade it; locate each named object.
    palette = {c: tuple(v) for c, v in info["palette"].items()} if info else None
    records = []
    for text, prompt in prompts.items():
        for seed in seeds:
            path = samples_dir / Job(text, seed).file_name
            detections = detect(read_image(path), palette, detector)
            located = match_objects(prompt, detections, "binding")
            records.append({"prompt": prompt, "seed": seed, "path": path, "detections": detections, "located": located})

    # 4. Grade the shapes images; score the maps against detected objects and/or the user's masks.
    localisation = []
    if is_shapes:
        fidelity = evaluate_fidelity(tasks, records)
        table = LocalisationTable(("colour", "shape"))
        counts = localise_shapes(records, table)
        source = "the detector: each colour and shape word -> the detected object of that colour and shape"
        localisation.append(localisation_section(source, table, counts))
    else:
        fidelity = {
            "applies": False,
            "message": f"Prompt fidelity applies to the shapes domain only; this model was trained on {cfg.data.dataset}.",
        }
    if rows is not None:
        table = LocalisationTable(("word",))
        counts = localise_user_masks(rows, samples_dir, table)
        for problem in counts["problems"]:
            print(f"warning: --masks {problem}", file=sys.stderr)
        localisation.append(localisation_section(f"the user's masks ({args.masks})", table, counts))

    results = {
        "model": str(model_dir),
        "run_name": run_name(model_dir),
        "images": len(jobs),
        "settings": {
            "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance,
            "guidance_rescale": args.guidance_rescale, "scheduler": args.scheduler, "quick": args.quick,
            "layout_guidance": args.layout_guidance,
            "relation_margin_px": RELATION_MARGIN_PX, "detector": detector.to_dict(),
        },
        "dataset_info": info_source,
        "fidelity": fidelity,
        "localisation": localisation,
    }
    results["per_image"] = [
        {
            "image": str(r["path"].relative_to(out_dir)),
            "prompt": r["prompt"].text,
            "seed": r["seed"],
            "detections": [d.to_dict() for d in r["detections"]],
            "verdicts": r.get("verdicts", {}),
        }
        for r in records
    ]

    # 5. Reports.
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    tiles = failure_grid(records, out_dir / "failures.png") if is_shapes else 0
    results["failure_tiles"] = tiles
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = evaluate(args)
    out_dir = Path(args.out) if args.out else Path("outputs/eval") / results["run_name"]
    print(markdown(results))
    written = ["results.json", "results.md"] + (["failures.png"] if results["failure_tiles"] else [])
    print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
