"""Prompt-to-prompt on the shapes: is the edit applied, and is the layout kept? Graded by the detector.

72 source prompts in the dataset's grammar (a third single objects, two thirds two objects in a
stated relation), each with one edit: 24 swap a shape word (`a red circle left of a blue square` ->
`a red star left of ...`), 24 a colour word, 24 add a size word (`a small red circle ...`). Each is
sampled with seeds 0 and 1 by the default sampler, the edit beside its source (pipe.edit), and graded:

* edit applied: the edited image passes the edited prompt on every clause (count, colour, shape, the
  size word where given, the relation);
* layout kept: every object of the edited image lies within 2 px of its source's centre with the same
  size class (but the object whose size word the edit adds), and each object the edit does not name
  keeps its colour and shape with mask IoU >= 0.8 against its source's;

over the pairs whose source passes its own prompt. Beside them, two baselines: the edited prompt sampled
alone with the same seed (no injection), and the source image taken as the edit. Settings run one after
another: `--cross` fractions at `--self` 0.4, then `--self` fractions at the default cross fraction.

Re-weighting is shown, not graded: the shape word of the first object of the two-object prompts weighted
by each of `--weights` (the edit is the prompt itself), with the word's share of the summed word maps and
its object's presence and area.

    PYTHONPATH=. python bench/edit_benchmark.py --model outputs/runs/cpu --out outputs/bench/edit
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusion.evaluation.detector import Detection, DetectorSettings, detect
from diffusion.evaluation.prompts import EvalPrompt, Vocabulary, check, make_prompt, match_objects
from diffusion.data.relations import RELATIONS
from diffusion.runs import find_model_dir, read_run_config, shapes_info
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.settings import CROSS_REPLACE, SELF_REPLACE, EditSettings

CENTRE_PX = 2.0
MIN_IOU = 0.8


@dataclass
class Case:
    kind: str  # "shape", "colour" or "size"
    source: EvalPrompt
    edited: EvalPrompt
    target: int  # the object the edit names


def make_cases(vocab: Vocabulary, per_kind: int, seed: int = 0) -> list[Case]:
    """`per_kind` edits of each kind, a third on single objects, the rest on two objects in a relation."""
    rng = random.Random(seed)
    fine = [(c, s) for c in vocab.colours for s in vocab.shapes if (c, s) not in vocab.held_out_pairs]
    cases = []
    for kind in ("shape", "colour", "size"):
        while sum(c.kind == kind for c in cases) < per_kind:
            two = sum(c.kind == kind for c in cases) >= per_kind // 3
            objects = rng.sample(fine, 2 if two else 1)
            if two and objects[0][0] == objects[1][0]:
                continue  # two objects of one colour: the detector cannot tell which is which
            relations = (rng.choice(RELATIONS),) if two else ()
            target = rng.randrange(len(objects))
            colour, shape = objects[target]
            if kind == "shape":
                new = (colour, rng.choice([s for s in vocab.shapes if s != shape]))
            elif kind == "colour":
                new = (rng.choice([c for c in vocab.colours if c not in {o[0] for o in objects}]), shape)
            else:
                new = (colour, shape)
            if new in vocab.held_out_pairs:
                continue
            edited = list(objects)
            edited[target] = new
            sizes = [None] * len(objects)
            source = make_prompt([(c, s, None) for c, s in objects], relations)
            if kind == "size":
                sizes[target] = rng.choice(["small", "large"])
            edit = make_prompt([(c, s, z) for (c, s), z in zip(edited, sizes)], relations)
            if vocab.held_out_in([(c, s, None) for c, s in edited], relations) or vocab.held_out_in([(c, s, None) for c, s in objects], relations):
                continue
            cases.append(Case(kind, source, edit, target))
    return cases


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def layout_kept(case: Case, source: list[Detection], edited: list[Detection]) -> bool:
    """Every object where its source was, the same size (but a resized one), the unnamed ones unchanged."""
    before = match_objects(case.source, source, "binding")
    after = match_objects(case.edited, edited, "binding")
    if len(edited) != len(source) or None in before or None in after:
        return False
    for k, (s, e) in enumerate(zip(before, after)):
        s, e = source[s], edited[e]
        if not (k == case.target and case.kind == "size"):
            if np.hypot(s.centre[0] - e.centre[0], s.centre[1] - e.centre[1]) > CENTRE_PX or s.size != e.size:
                return False
        if k != case.target and (s.colour, s.shape) != (e.colour, e.shape) or k != case.target and iou(s.mask, e.mask) < MIN_IOU:
            return False
    return True


def grade(jobs, sources, edits, palette) -> dict:
    """Rates over the pairs whose source passes its own prompt, overall and per kind."""
    rows = []
    for (case, _), source, edit in zip(jobs, sources, edits):
        found_source = detect(np.asarray(source), palette, DetectorSettings())
        found_edit = detect(np.asarray(edit), palette, DetectorSettings())
        if not check(case.source, found_source, "all").passed:
            rows.append((case.kind, None, None))
            continue
        rows.append((case.kind, check(case.edited, found_edit, "all").passed, layout_kept(case, found_source, found_edit)))
    result = {}
    for kind in ("all", "shape", "colour", "size"):
        graded = [r for r in rows if r[1] is not None and kind in ("all", r[0])]
        both = sum(a and k for _, a, k in graded)
        result[kind] = {
            "pairs": len(graded), "applied": sum(a for _, a, _ in graded) / len(graded),
            "kept": sum(k for _, _, k in graded) / len(graded), "both": both / len(graded),
        }
    result["sources_failed"] = sum(r[1] is None for r in rows)
    return result


def run_edits(pipe, jobs: list[tuple[Case, int]], edit: EditSettings, batch: int):
    """Each (case, seed)'s source and edited images."""
    sources, edits = [], []
    for i in range(0, len(jobs), batch):
        part = jobs[i : i + batch]
        out = pipe.edit([c.source.text for c, _ in part], [c.edited.text for c, _ in part], [s for _, s in part], edit)
        sources += out.source.images
        edits += out.edited.images
    return sources, edits


def reweight_table(pipe, cases, seeds, weights, palette, batch) -> list[dict]:
    """For each weight: the reweighted word's share of the word maps, its object's presence and area."""
    pairs = [c for c in cases if c.kind == "shape" and len({o.shape for o in c.source.objects}) == 2]
    by_word: dict[str, list[Case]] = {}
    for case in pairs:
        by_word.setdefault(case.source.objects[0].shape, []).append(case)
    rows = []
    for weight in weights:
        shares, present, areas = [], [], []
        for seed in seeds:
            for word, group in by_word.items():
                texts = [c.source.text for c in group]
                out = pipe.edit(texts, texts, [seed] * len(group), EditSettings(reweight=((word, weight),)), return_attention=True)
                for case, image, attention in zip(group, out.edited.images, out.edited.attention):
                    maps = attention.word_maps().sum(dim=(1, 2))  # (W,)
                    shares.append(float(maps[case.source.objects[0].words["shape"]] / maps.sum()))
                    found = detect(np.asarray(image), palette, DetectorSettings())
                    match = match_objects(case.source, found, "binding")[0]
                    present.append(match is not None)
                    areas.append(found[match].area if match is not None else 0)
        found_areas = [a for a, p in zip(areas, present) if p]
        rows.append({"weight": weight, "images": len(shares), "share": statistics.mean(shares),
                     "present": statistics.mean(present), "area": statistics.mean(found_areas) if found_areas else 0.0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="outputs/bench/edit")
    parser.add_argument("--per-kind", type=int, default=24)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--cross", default="0,0.2,0.4,0.6,0.8,1")
    parser.add_argument("--self", dest="self_", default="0,0.2,0.6")
    parser.add_argument("--weights", default="0,0.5,1,2,3")
    parser.add_argument("--batch", type=int, default=24)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    model_dir = find_model_dir(args.model)
    pipe = TextToImagePipeline.from_run(model_dir)
    info, _ = shapes_info(read_run_config(model_dir), model_dir)
    palette = {c: tuple(v) for c, v in info["palette"].items()}
    cases = make_cases(Vocabulary.from_info(info), args.per_kind)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"cases": [{"kind": c.kind, "source": c.source.text, "edited": c.edited.text} for c in cases], "settings": []}

    start = time.perf_counter()
    jobs = [(case, seed) for seed in seeds for case in cases]
    alone = []
    for i in range(0, len(jobs), args.batch):
        part = jobs[i : i + args.batch]
        alone += pipe([c.edited.text for c, _ in part], [s for _, s in part]).images
    settings = [(float(c), SELF_REPLACE) for c in args.cross.split(",")]
    settings += [(CROSS_REPLACE, float(s)) for s in args.self_.split(",") if float(s) != SELF_REPLACE]
    for cross, self_ in settings:
        t0 = time.perf_counter()
        sources, edits = run_edits(pipe, jobs, EditSettings(cross_replace=cross, self_replace=self_), args.batch)
        row = {"cross_replace": cross, "self_replace": self_, **grade(jobs, sources, edits, palette), "seconds": time.perf_counter() - t0}
        results["settings"].append(row)
        print(json.dumps(row), flush=True)
    # The baselines, on the same sources: the edited prompt alone (same seed), and the source as the edit.
    results["no_injection"] = grade(jobs, sources, alone, palette)
    results["source_as_edit"] = grade(jobs, sources, sources, palette)
    print("no injection", json.dumps(results["no_injection"]), "source as edit", json.dumps(results["source_as_edit"]), flush=True)
    results["reweight"] = reweight_table(pipe, cases, seeds, [float(w) for w in args.weights.split(",")], palette, args.batch)
    print(json.dumps(results["reweight"]))
    results["minutes"] = (time.perf_counter() - start) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for i in range(8):  # a few pairs to look at
        sources[i].resize((128, 128)).save(out / f"pair{i}_source.png")
        edits[i].resize((128, 128)).save(out / f"pair{i}_edit.png")


if __name__ == "__main__":
    main()
