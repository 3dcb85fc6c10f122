"""The evaluation's reports: results.md (from results.json's content) and failures.png."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from diffusion.evaluation.localisation import THRESHOLD, THRESHOLD_SWEEP
from diffusion.images import tile

if TYPE_CHECKING:
    from diffusion.evaluation.fidelity import ImageRecord

MAX_FAILURE_TILES = 60
FAILURE_COLUMNS = 6
TILE_WIDTH = 200  # pixels; the image fills it but for a 4-pixel margin on each side
TEXT_WIDTH = 32  # characters per line of a tile's caption
MAP_NAMES = {
    "own": "its own map",
    "own_two_objects": "its own map, two-object prompts",
    "swapped": "baseline: the other object's word",
    "uniform": "baseline: uniform map",
}


# ---------------------------------------------------------------------------------------------
# results.md
# ---------------------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    """results.md: the settings, the fidelity table (shapes models) and every localisation table."""
    s = results["settings"]
    lines = [
        f"# Evaluation of {results['run_name']}",
        "",
        f"Model `{results['model']}`; {s['seeds']} seed(s) per prompt, {s['steps']} {s['scheduler']} steps, "
        f"guidance {s['guidance']}"
        + (f", layout guidance {s['layout_guidance']}" if s.get("layout_guidance") else "")
        + (" (quick)" if s["quick"] else "") + f"; {results['images']} images.",
        "",
        "## Prompt fidelity",
        "",
    ]
    fidelity = results["fidelity"]
    if fidelity["applies"]:
        lines += fidelity_markdown(fidelity, s["relation_margin_px"])
    else:
        lines += [fidelity["message"], ""]
    if results.get("real_data"):
        lines += real_data_markdown(results["real_data"])
    lines += ["## Attention localisation", ""]
    if not results["localisation"]:
        lines += ["Needs the objects' masks: pass --masks FILE (python -m diffusion.evaluation --help).", ""]
    for section in results["localisation"]:
        lines += localisation_markdown(section)
    return "\n".join(lines) + "\n"


def card_markdown(results: dict) -> str:
    """The model card's evaluation section (diffusion.card): results.md without its confusion tables."""
    s = results["settings"]
    lines = [
        f"`python -m diffusion.evaluation`: {s['seeds']} seed(s) per prompt, {s['steps']} {s['scheduler']} steps, guidance "
        f"{s['guidance']}, layout guidance {s['layout_guidance']}" + (" (quick)" if s["quick"] else "") + f"; {results['images']} images.",
        "",
    ]
    fidelity = results["fidelity"]
    if fidelity["applies"]:
        table = fidelity_markdown(fidelity, s["relation_margin_px"])
        lines += table[: table.index("") + 1]  # the task table, not the confusion tables
    if results.get("real_data"):
        lines += real_data_markdown(results["real_data"])
    for section in results["localisation"]:
        lines += localisation_markdown(section)
    return "\n".join(lines)


def real_data_markdown(real: dict) -> list[str]:
    """One table per split: R-precision and KID of the generated images beside the real images and baselines."""
    if "skipped" in real:
        return ["## Generation quality on the dataset's own images", "", f"Not measured: {real['skipped']}", ""]
    lines = [
        "## Generation quality on the dataset's own images",
        "",
        f"Judged by a tiny CLIP trained on the dataset's own captions with another seed than the UNet's text tower "
        f"(`{real['judge']}`), so it shares none of its weights: R-precision is the share of images whose own "
        f"caption the judge ranks first among {real['candidates']}; KID x 1000 is measured against the real images "
        "of the same captions (lower is closer; the spread is over random subsets).",
        "",
    ]
    for split in real["splits"]:
        lines += [f"**{split['split']}** ({split['captions']} captions)", "",
                  "| images | n | R-precision | KID x 1000 |", "| --- | --- | --- | --- |"]
        for name, row in split["rows"].items():
            spread = f" ± {row['kid_std']:.2f}" if row.get("kid_std") else " (whole sets: no subsets to spread over)"
            distance = f"{row['kid_x1000']:.2f}{spread}" if "kid_x1000" in row else "(the reference)"
            lines.append(f"| {name} | {row['images']} | {row['r_precision']:.3f} | {distance} |")
        lines.append("")
    return lines


def fidelity_markdown(fidelity: dict, relation_margin_px: float) -> list[str]:
    """The task table, the overall and the held-out row, how an image passes, and the confusion tables."""
    lines = [
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
    if "three_objects" in tasks:
        t = tasks["three_objects"]
        lines.append(f"| three_objects | {t['description']} | {t['score']:.3f} | {t['passed']} / {t['images']} | {failed_on(t)} |")
    lines += [
        "",
        f"An image passes when it holds exactly the prompt's number of objects and every graded clause holds; "
        f"a relation holds when the centres differ by at least {relation_margin_px} px in the stated "
        f"direction. A size word is graded only where the prompt has one. Failed images (up to {MAX_FAILURE_TILES}, "
        "seed 0 of every prompt first): failures.png.",
        "",
    ]
    return lines + confusion_markdown(fidelity["confusion"])


def failed_on(task: dict) -> str:
    return " / ".join(str(task["failed_on"][k]) for k in ("count", "object", "relation"))


def confusion_markdown(table: dict) -> list[str]:
    """Asked (row) -> drawn (column) counts for colour and for shape."""
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
    """One localisation section: scores at THRESHOLD, mIoU over the sweep, and what was left out."""
    t = f"{THRESHOLD:.1f}"
    lines = [
        f"Masks from {loc['source']}. Each word's map ({loc['map']}) is divided by its own maximum "
        f"and thresholded at {THRESHOLD} for the IoU; pointing: the map's maximum lies inside the object.",
        "",
        f"| word | map | mIoU@{t} | pointing | image area marked@{t} | instances |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for word_type, kinds in loc["table"].items():
        for kind, summary in kinds.items():
            lines.append(
                f"| {word_type} | {MAP_NAMES[kind]} | {fmt(summary['miou'][t])} | {fmt(summary['pointing'])} "
                f"| {fmt(summary['coverage'])} | {summary['n']} |"
            )
    lines += ["", "mIoU over thresholds:", "", "| word | map | " + " | ".join(f"{x:.1f}" for x in THRESHOLD_SWEEP) + " |"]
    lines.append("| --- | --- |" + " --- |" * len(THRESHOLD_SWEEP))
    for word_type, kinds in loc["table"].items():
        for kind in ("own", "swapped"):
            values = " | ".join(fmt(kinds[kind]["miou"][f"{x:.1f}"]) for x in THRESHOLD_SWEEP)
            lines.append(f"| {word_type} | {MAP_NAMES[kind]} | {values} |")
    counts = loc["counts"]
    skipped = {k: v for k, v in counts.items() if k not in ("objects", "scored", "problems")}
    left_out = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in skipped.items())
    lines += ["", f"Objects named: {counts['objects']}; scored: {counts['scored']}; left out: {left_out}.", ""]
    if not counts["scored"]:
        lines += ["No object could be scored, so the table is empty (n/a).", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# failures.png
# ---------------------------------------------------------------------------------------------


def failure_tile(record: ImageRecord) -> Image.Image:
    """The image (detections boxed) over its prompt, seed and each failed task's reason; TILE_WIDTH wide."""
    image = Image.open(record.path).convert("RGB")
    side = TILE_WIDTH - 8
    picture = image.resize((side, side), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    scale = side / image.width
    for d in record.detections:
        x0, y0, x1, y1 = (v * scale for v in d.bbox)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 0, 0))
    reasons: dict[str, list[str]] = {}  # reason -> the tasks that failed for it
    for task, verdict in record.verdicts.items():
        if not verdict["passed"]:
            reasons.setdefault(verdict["reason"], []).append(task)
    text = [f"{record.prompt.text} (seed {record.seed})"]
    text += [f"{', '.join(tasks)}: {reason}" for reason, tasks in reasons.items()]
    wrapped = [w for line in text for w in textwrap.wrap(line, TEXT_WIDTH)]
    tile_image = Image.new("RGB", (TILE_WIDTH, side + 8 + 12 * len(wrapped)), "white")
    tile_image.paste(picture, (4, 4))
    ImageDraw.Draw(tile_image).multiline_text((4, side + 6), "\n".join(wrapped), fill=(0, 0, 0), spacing=2)
    return tile_image


def failure_grid(records: list[ImageRecord], path: Path) -> int:
    """A grid of failed images (detections boxed) with each failed task's reason; returns how many tiles.
    With no failed image, no grid (an older one at `path` is removed)."""
    failed = sorted((r for r in records if r.failed), key=lambda r: r.seed)  # stable: seed 0's, then seed 1's...
    tiles = [failure_tile(record) for record in failed[:MAX_FAILURE_TILES]]
    if not tiles:
        path.unlink(missing_ok=True)
        return 0
    tile(tiles, FAILURE_COLUMNS, background=(200, 200, 200)).save(path)
    return len(tiles)
