"""Attention localisation (in the manner of DAAM): does a word's map point at its object?

Each word's map (W, S, S) is read back from the image's `.attn/` folder, divided by its maximum and
thresholded; the IoU with the object's mask and the pointing game (the map's maximum lies inside the
object) score it. The masks come from the detector (shapes models: every colour and shape word ->
the detected object it names) or from the user (--masks JSONL). Two baselines sit in the same table:
a uniform map, and the map of the same kind of word of the OTHER object ("swapped").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffusion.data.folder import load_mask
from diffusion.errors import UserError
from diffusion.maps.format import read_word_maps

if TYPE_CHECKING:
    from diffusion.evaluation.fidelity import ImageRecord

THRESHOLD = 0.5  # a word's map, divided by its maximum, marks the pixels where it is >= this
THRESHOLD_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)
MASK_LEVEL = 127  # user mask pixels above this grey level are the object


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (S, S); 0 when both are empty."""
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
    """Mean IoU per threshold, pointing and coverage over scores; None where there are none."""
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

    def add_word(self, word_type: str, own_map: np.ndarray, mask: np.ndarray, other_map: np.ndarray | None) -> None:
        """One word's map (S, S) against its object's mask: own and uniform, and where the prompt
        names another object, own on two-object prompts and swapped (that object's map, `other_map`)."""
        own = score_map(own_map, mask)
        self.add(word_type, "own", own)
        self.add(word_type, "uniform", score_uniform(mask))
        if other_map is not None:
            self.add(word_type, "own_two_objects", own)
            self.add(word_type, "swapped", score_map(other_map, mask))

    def summary(self) -> dict:
        return {w: {k: summarise(v) for k, v in kinds.items()} for w, kinds in self.scores.items()}


def localisation_section(source: str, table: LocalisationTable, counts: dict) -> dict:
    """One results.json localisation entry: where the masks came from, the method and the table."""
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
# Masks from the detector (shapes models)
# ---------------------------------------------------------------------------------------------


def localise_shapes(records: list[ImageRecord], table: LocalisationTable) -> dict:
    """Score each colour and shape word's map against its object's detected mask; counts of what was left out."""
    counts = {"objects": 0, "scored": 0, "object_not_found": 0, "word_not_in_maps": 0}
    for record in records:
        prompt = record.prompt
        words, maps = read_word_maps(record.path)  # maps: (W, S, S)
        for k, obj in enumerate(prompt.objects):
            counts["objects"] += 1
            if record.located[k] is None:
                counts["object_not_found"] += 1
                continue
            mask = record.detections[record.located[k]].mask  # bool (S, S)
            if mask.shape != maps.shape[1:]:
                raise ValueError(f"{record.path}: maps are {maps.shape[1:]} but the image is {mask.shape}")
            if any(i >= len(words) or words[i] != getattr(obj, t) for t, i in obj.words.items() if t != "size"):
                counts["word_not_in_maps"] += 1
                continue
            counts["scored"] += 1
            other = prompt.objects[1 - k] if len(prompt.objects) == 2 else None
            for word_type in ("colour", "shape"):
                other_map = maps[other.words[word_type]] if other is not None else None
                table.add_word(word_type, maps[obj.words[word_type]], mask, other_map)
    return counts


# ---------------------------------------------------------------------------------------------
# Masks from the user (--masks)
# ---------------------------------------------------------------------------------------------


@dataclass
class MaskRow:
    """One --masks row: a (prompt, seed) image and the masks of some of its words."""

    prompt: str
    seed: int
    masks: dict[str, Path]  # word -> mask file
    line: int  # in the JSONL file, for messages


def read_masks_file(path: Path) -> list[MaskRow]:
    """Rows {"prompt", "seed", "masks": {word: mask path}} with checks that name the row."""
    if not path.is_file():
        raise UserError(f"--masks {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            rows.append(parse_mask_row(line, path, number))
    if not rows:
        raise UserError(f"--masks {path} holds no rows")
    return rows


def parse_mask_row(line: str, path: Path, number: int) -> MaskRow:
    """Line `number` of the --masks file at `path`; mask paths are relative to that file."""
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
    return MaskRow(row["prompt"], int(row.get("seed", 0)), masks, number)


def localise_user_masks(rows: list[MaskRow], samples_dir: Path, table: LocalisationTable) -> dict:
    """Score each masked word's map against the user's mask; the swapped baseline uses another masked word."""
    from diffusion.sampling.generate import Job

    counts = {"objects": 0, "scored": 0, "word_not_in_prompt": 0, "empty_mask": 0}
    problems = []
    for row in rows:
        words, maps = read_word_maps(samples_dir / Job(row.prompt, row.seed).file_name)  # maps: (W, S, S)
        lowered = [w.lower() for w in words]
        index, masks = {}, {}
        for word, mask_path in row.masks.items():
            counts["objects"] += 1
            if word.lower() not in lowered:
                counts["word_not_in_prompt"] += 1
                problems.append(f"line {row.line}: {word!r} is not a word of {row.prompt!r} (words: {words})")
                continue
            mask = load_mask(mask_path, maps.shape[-1], grey=True) > MASK_LEVEL  # (S, S) bool
            if not mask.any():
                counts["empty_mask"] += 1
                problems.append(f"line {row.line}: the mask of {word!r} ({mask_path}) is empty")
                continue
            index[word], masks[word] = lowered.index(word.lower()), mask
        for word, mask in masks.items():
            counts["scored"] += 1
            others = [w for w in masks if w != word]
            table.add_word("word", maps[index[word]], mask, maps[index[others[0]]] if others else None)
    return {**counts, "problems": problems}
