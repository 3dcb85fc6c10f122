"""Does the model follow the prompt, and do its attention maps point at the right object?

    python -m diffusion.evaluation --model outputs/runs/cpu
    python -m diffusion.evaluation --model outputs/runs/cpu --seeds 8 --scheduler ddpm --steps 100 --out outputs/eval/cpu
    python -m diffusion.evaluation --model outputs/runs/cpu --quick          # a handful of prompts, 2 seeds
    python -m diffusion.evaluation --model outputs/runs/mine                        # a model of your own data
    python -m diffusion.evaluation --model outputs/runs/mine --masks masks.jsonl   # ... and its maps against your masks

Prompt fidelity (in the manner of GenEval; shapes models only): the prompts of
`diffusion.evaluation.prompts` are sampled with several seeds, `diffusion.evaluation.detector`
finds the objects in each image, and an image passes a task when every clause the task grades
holds. A task's score is its fraction of passing images; "overall" is the mean over the distinct
prompt sets on trained compositions (single objects, pairs, sizes; each graded on all its clauses,
so no image counts twice); the held-out compositions and the three-object prompts ("A rel B and C
rel the B") are reported beside it. The colour,
shape, two_objects and colour_binding rows grade the same images on fewer clauses and are shown,
not averaged.

Generation quality on your own data (diffusion.evaluation.realdata): --captions distinct captions of
the held-out split (data.test_fraction, or the folder's test/) and of the training split are sampled
with each seed; a tiny CLIP trained on the dataset's captions with another seed than the UNet's text
tower scores each image by R-precision (its caption ranked first among 100) and each set by KID against
the real images of those captions, beside the real images themselves, the same blurred, and random
training images.

Attention localisation (in the manner of DAAM): the sampler writes each image's word maps
(`<name>.attn/maps.npz`, `manifest.json`), which are read back; each colour and shape word's map,
divided by its maximum and thresholded, is compared with the mask of the object the detector
found for that word (IoU), and its maximum should lie inside that object (pointing game). Two
baselines sit in the same table: a uniform map, and the map of the same kind of word of the OTHER
object of a two-object prompt ("swapped"). With --masks the masks come from the user instead:
JSONL rows {"prompt": ..., "seed": 0, "masks": {"word": "mask.png"}} (mask pixels > 127 are the
object; paths relative to the JSONL file).

Everything goes to --out (default outputs/eval/<run name>/): samples/ (images and maps),
results.json, results.md and failures.png (failed images, each with its reasons). Images already
there are reused when their manifests record the same model and sampler settings.

The command; the parts are diffusion.evaluation.fidelity (grading), .localisation (map scores)
and .report (results.md, failures.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion.devices import add_device_argument, use_device
from diffusion.errors import UserError, exit_on_user_error
from diffusion.files import check_folder_path
from diffusion.evaluation.detector import DetectorSettings
from diffusion.evaluation.fidelity import ImageRecord, evaluate_fidelity
from diffusion.evaluation.localisation import (
    LocalisationTable,
    MaskRow,
    localisation_section,
    localise_shapes,
    localise_user_masks,
    read_masks_file,
)
from diffusion.evaluation.prompts import RELATION_MARGIN_PX, EvalPrompt, build_tasks
from diffusion.evaluation.report import card_markdown, failure_grid, markdown
from diffusion.card import write_evaluation
from diffusion.maps.format import MANIFEST_FILE, attn_folder
from diffusion.runs import find_model_dir, read_run_config, read_training_info, run_name, shapes_info
from diffusion.sampling.settings import SamplerSettings

if TYPE_CHECKING:
    from diffusion.config import Config
    from diffusion.sampling.generate import Job

# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def output_dir(args: argparse.Namespace, name: str) -> Path:
    """--out, or outputs/eval/<run name>."""
    return Path(args.out) if args.out else Path("outputs/eval") / name


def plan_jobs(prompts: dict[str, EvalPrompt], seeds: list[int], rows: list[MaskRow] | None) -> list[Job]:
    """The images to evaluate: every shapes prompt with every seed, then the user's (prompt, seed) rows."""
    from diffusion.sampling.generate import Job

    jobs = [Job(text, seed) for text in prompts for seed in seeds]
    if rows is not None:
        jobs += [job for job in dict.fromkeys(Job(r.prompt, r.seed) for r in rows) if job not in jobs]
    return jobs


def model_record(model_dir: Path) -> dict:
    """What a manifest records of the model: its path and, when known, its training step."""
    record = {"model": str(model_dir.resolve())}
    step = read_training_info(model_dir).get("step")
    if step is not None:  # a re-exported model at the same path has another step
        record["model_step"] = step
    return record


def sample_missing(jobs: list[Job], samples_dir: Path, args, model_dir: Path) -> None:
    """Sample the jobs whose image and maps are not in samples_dir yet, and say how many were sampled and reused.

    An image already there is reused when its manifest records the same model (path and training
    step) and sampler settings (scheduler, steps, guidance scale, layout guidance); one made with
    other settings stops the evaluation unless --overwrite.
    """
    from diffusion.maps.aggregate import MapSettings
    from diffusion.sampling.generate import generate
    from diffusion.sampling.pipeline import TextToImagePipeline

    names = [j.file_name for j in jobs]
    if len(set(names)) != len(names):
        raise UserError("two prompts map to the same file name; make them differ in their first 60 characters")
    model = model_record(model_dir)
    expected = {**model, **args.sampler.manifest()}
    todo = []
    for job in jobs:
        image = samples_dir / job.file_name
        manifest = attn_folder(image) / MANIFEST_FILE
        if args.overwrite or not manifest.is_file() or not image.is_file():
            todo.append(job)
            continue
        recorded = json.loads(manifest.read_text())
        stored = {key: recorded.get(key) for key in expected}  # what it was made with, on the expected keys as they are
        if stored != expected:
            raise UserError(
                f"{samples_dir} holds {job.file_name} made with other settings ({stored}); "
                "pass --overwrite to resample or choose another --out"
            )
    if todo:
        generate(
            TextToImagePipeline.from_run(model_dir, device=args.device), todo, samples_dir, args.sampler,
            args.batch_size, maps=MapSettings(keep_layers=False), extra_manifest=model, progress=not args.no_progress,
        )
    print(f"{len(todo)} image(s) sampled, {len(jobs) - len(todo)} reused, in {samples_dir}")


# ---------------------------------------------------------------------------------------------
# The two evaluations: a shapes model, and a model of the user's own data
# ---------------------------------------------------------------------------------------------

DETECTOR = DetectorSettings()  # the detector's settings, recorded in results.json


@dataclass
class Findings:
    """One evaluation's part of results.json, and how many failed images failures.png shows."""

    images: int  # sampled or reused
    dataset_info: str | None  # where the shapes dataset's description came from
    fidelity: dict
    real_data: dict | None
    localisation: list[dict]
    per_image: list[dict] = field(default_factory=list)
    failure_tiles: int = 0


def detector_localisation(records: list[ImageRecord]) -> dict:
    """The localisation section of a shapes model: each colour and shape word against its detected object."""
    table = LocalisationTable(("colour", "shape"))
    counts = localise_shapes(records, table)
    source = "the detector: each colour and shape word -> the detected object of that colour and shape"
    return localisation_section(source, table, counts)


def user_localisation(rows: list[MaskRow] | None, samples_dir: Path, masks_file: str | None) -> list[dict]:
    """The localisation section of --masks, if given: each masked word against the user's mask (problems warned about)."""
    if rows is None:
        return []
    table = LocalisationTable(("word",))
    counts = localise_user_masks(rows, samples_dir, table)
    for problem in counts["problems"]:
        print(f"warning: --masks {problem}", file=sys.stderr)
    return [localisation_section(f"the user's masks ({masks_file})", table, counts)]


def real_data_section(cfg, splits, pool: list[str], samples_dir: Path, seeds: list[int]) -> dict:
    """R-precision and KID of each split's generated images, judged by a tiny CLIP independent of the UNet's text tower."""
    from PIL import Image

    from diffusion.evaluation.realdata import CANDIDATES, Judge, score_split
    from diffusion.sampling.generate import Job

    judge = Judge.for_run(cfg)
    pool_embeddings = judge.captions(pool)
    scored = []
    for split in splits:
        generated = [[Image.open(samples_dir / Job(c, seed).file_name).convert("RGB") for seed in seeds] for c in split.captions]
        scored.append(score_split(judge, split, generated, pool, pool_embeddings))
    return {"judge": judge.source, "candidates": CANDIDATES, "splits": scored}


def evaluate_shapes(args, model_dir: Path, cfg: Config, rows: list[MaskRow] | None, out_dir: Path) -> Findings:
    """A shapes model: the prompts of its dataset's tasks with every seed, graded by the detector (prompt
    fidelity, failures.png), and each colour and shape word's map against its detected object (and --masks)."""
    from diffusion.sampling.generate import Job

    samples_dir, seeds = out_dir / "samples", list(range(args.seeds))
    # 1. Sample what is missing: every prompt with every seed, then the user's (prompt, seed) rows.
    info, info_source = shapes_info(cfg, model_dir)
    tasks = build_tasks(info, quick=args.quick)
    prompts = {p.text: p for task in tasks for p in task.prompts}
    jobs = list(dict.fromkeys(plan_jobs(prompts, seeds, rows)))
    sample_missing(jobs, samples_dir, args, model_dir)
    # 2. Detect the objects of every image and locate each named object.
    palette = {c: tuple(v) for c, v in info["palette"].items()}
    records = [
        ImageRecord.detect(prompt, seed, samples_dir / Job(text, seed).file_name, palette, DETECTOR)
        for text, prompt in prompts.items()
        for seed in seeds
    ]
    # 3. Grade the images; score the maps against the detected objects and the user's masks.
    fidelity = evaluate_fidelity(tasks, records)
    localisation = [detector_localisation(records), *user_localisation(rows, samples_dir, args.masks)]
    return Findings(
        len(jobs), info_source, fidelity, None, localisation, per_image=[r.to_dict(out_dir) for r in records],
        failure_tiles=failure_grid(records, out_dir / "failures.png"),
    )


def evaluate_own_data(args, model_dir: Path, cfg: Config, rows: list[MaskRow] | None, out_dir: Path) -> Findings:
    """A model of the user's own data: its captions' images judged by the dataset's own CLIP beside real images,
    and with --masks each masked word's map against the user's mask. Prompt fidelity does not apply."""
    from diffusion.evaluation.realdata import read_splits
    from diffusion.sampling.generate import Job

    samples_dir, seeds = out_dir / "samples", list(range(args.seeds))
    # 1. Sample what is missing: the user's (prompt, seed) rows, then each split's captions with every seed.
    splits, pool, real_data = [], [], None
    try:
        splits, pool = read_splits(cfg, args.captions)
    except UserError as error:
        if rows is None:
            raise
        real_data = {"skipped": str(error)}  # --masks still scores the maps
        print(f"warning: no real-data quality: {error}", file=sys.stderr)
    jobs = plan_jobs({}, seeds, rows) + [Job(c, seed) for split in splits for c in split.captions for seed in seeds]
    jobs = list(dict.fromkeys(jobs))
    sample_missing(jobs, samples_dir, args, model_dir)
    # 2. Judge each split's images; score the maps against the user's masks.
    if splits:
        real_data = real_data_section(cfg, splits, pool, samples_dir, seeds)
    fidelity = {
        "applies": False,
        "message": f"Prompt fidelity applies to the shapes domain only; this model was trained on {cfg.data.dataset}.",
    }
    return Findings(len(jobs), None, fidelity, real_data, user_localisation(rows, samples_dir, args.masks))


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked; args.sampler holds the sampler settings (SamplerSettings)."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a run folder (outputs/runs/<name>) or an exported model folder")
    parser.add_argument("--out", help="output folder (default outputs/eval/<run name>)")
    parser.add_argument("--seeds", type=int, help="seeds per prompt, 0..N-1 (default 4; 2 with --quick)")
    SamplerSettings.add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="a handful of prompts per task (for tests)")
    parser.add_argument("--captions", type=int, default=100,
                        help="a model of your own data: captions per split (held-out, training) to sample (default 100)")
    parser.add_argument("--masks", help="JSONL of {prompt, seed, masks: {word: mask.png}} for attention localisation")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    add_device_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="resample images already in the output folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 4
    if args.seeds < 1 or args.batch_size < 1:
        raise UserError("--seeds and --batch-size must be at least 1")
    if args.captions < 2:
        raise UserError("--captions must be at least 2 (KID compares sets of images)")
    args.sampler = SamplerSettings.from_args(args)
    if args.out:
        check_folder_path(args.out, "--out")
    args.device = use_device(args.device)  # a missing GPU is said before anything is sampled
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation the arguments ask for (a shapes model's or an own-data model's); write the reports
    and return results.json's content."""
    model_dir = find_model_dir(args.model)
    cfg = read_run_config(model_dir)
    rows = read_masks_file(Path(args.masks)) if args.masks else None
    out_dir = output_dir(args, run_name(model_dir))
    evaluation = evaluate_shapes if cfg.data.dataset == "shapes" else evaluate_own_data
    found = evaluation(args, model_dir, cfg, rows, out_dir)
    s = args.sampler
    results = {
        "model": str(model_dir),
        "run_name": run_name(model_dir),
        "images": found.images,
        "settings": {
            "seeds": args.seeds, "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler,
            "quick": args.quick, "layout_guidance": s.layout_guidance,
            "relation_margin_px": RELATION_MARGIN_PX, "detector": DETECTOR.to_dict(),
        },
        "dataset_info": found.dataset_info,
        "fidelity": found.fidelity,
        "real_data": found.real_data,
        "localisation": found.localisation,
        "per_image": found.per_image,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    write_evaluation(model_dir, card_markdown(results))  # the model card's table
    results["failure_tiles"] = found.failure_tiles
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = evaluate(args)
    out_dir = output_dir(args, results["run_name"])
    print(markdown(results))
    written = ["results.json", "results.md"] + (["failures.png"] if results["failure_tiles"] else [])
    print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    return 0
