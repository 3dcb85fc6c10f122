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
from diffusion.evaluation.report import failure_grid, markdown
from diffusion.maps.format import MANIFEST_FILE, attn_folder
from diffusion.sampling.settings import SamplerSettings

if TYPE_CHECKING:
    from diffusion.sampling.generate import Job

# ---------------------------------------------------------------------------------------------
# The model and its data
# ---------------------------------------------------------------------------------------------


def run_name(model_dir: Path) -> str:
    """outputs/runs/<name>/model -> <name>; any other model folder -> its own name."""
    return model_dir.parent.name if model_dir.name == "model" else model_dir.name


def output_dir(args: argparse.Namespace, name: str) -> Path:
    """--out, or outputs/eval/<run name>."""
    return Path(args.out) if args.out else Path("outputs/eval") / name


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


def shapes_info(cfg, model_dir: Path | None = None) -> tuple[dict, str]:
    """The dataset's dataset_info.json (held-out pairs and relations, palette, config), and where it came from.

    Read from the folder the model was trained on (training_info.json's train_dir) when it is there, so a
    model is judged by its own data; else from the cached dataset its config names now; else rebuilt from
    the run's config, which defines the dataset completely (only the held-out row count is then unknown).
    """
    from diffusion.data.shapes import dataset_info
    from diffusion.training.prepare import shapes_dir

    candidates = [shapes_dir(cfg.data, Path(cfg.cache_dir)) / "dataset_info.json"]
    recorded = read_training_info(model_dir).get("train_dir") if model_dir is not None else None
    if recorded:
        candidates.insert(0, Path(recorded).parent / "dataset_info.json")
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text()), str(path)
    return dataset_info(cfg.data.shapes, num_test_held_out=None), "rebuilt from the run's config (no cached dataset found)"


def read_training_info(model_dir: Path) -> dict:
    path = model_dir / "training_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


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


def stored_settings(manifest: dict, expected: dict) -> dict:
    """What a stored image manifest records of the keys of `expected` (model and sampler settings)."""
    stored = {k: manifest.get(k) for k in expected}
    if "layout_guidance" not in manifest:  # written before --layout-guidance existed: made without
        stored["layout_guidance"] = 0.0
    if manifest.get("guidance_rescale"):  # made with the retired --guidance-rescale: never the same settings
        stored["guidance_rescale"] = manifest["guidance_rescale"]
    return stored


def sample_missing(pipe_loader, jobs: list[Job], samples_dir: Path, args, model_dir: Path) -> tuple[int, int]:
    """Sample the jobs whose image and maps are not in samples_dir yet; (sampled, reused).

    An image already there is reused when its manifest records the same model (path and training
    step) and sampler settings (scheduler, steps, guidance scale, layout guidance); one made with
    other settings stops the evaluation unless --overwrite.
    """
    from diffusion.maps.aggregate import MapSettings
    from diffusion.sampling.generate import generate

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
        stored = stored_settings(json.loads(manifest.read_text()), expected)
        if stored != expected:
            raise UserError(
                f"{samples_dir} holds {job.file_name} made with other settings ({stored}); "
                "pass --overwrite to resample or choose another --out"
            )
    if todo:
        generate(
            pipe_loader(), todo, samples_dir, args.sampler, args.batch_size, maps=MapSettings(keep_layers=False),
            extra_manifest=model, progress=not args.no_progress,
        )
    return len(todo), len(jobs) - len(todo)


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


def detector_localisation(records: list[ImageRecord]) -> dict:
    """The localisation section of a shapes model: each colour and shape word against its detected object."""
    table = LocalisationTable(("colour", "shape"))
    counts = localise_shapes(records, table)
    source = "the detector: each colour and shape word -> the detected object of that colour and shape"
    return localisation_section(source, table, counts)


def user_localisation(rows: list[MaskRow], samples_dir: Path, masks_file: str) -> dict:
    """The localisation section of --masks: each masked word against the user's mask (problems warned about)."""
    table = LocalisationTable(("word",))
    counts = localise_user_masks(rows, samples_dir, table)
    for problem in counts["problems"]:
        print(f"warning: --masks {problem}", file=sys.stderr)
    return localisation_section(f"the user's masks ({masks_file})", table, counts)


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


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation the arguments ask for; write the reports and return results.json's content."""
    from diffusion.sampling.generate import Job
    from diffusion.sampling.pipeline import TextToImagePipeline, find_model_dir

    model_dir = find_model_dir(args.model)
    cfg = read_run_config(model_dir)
    is_shapes = cfg.data.dataset == "shapes"
    rows = read_masks_file(Path(args.masks)) if args.masks else None
    out_dir = output_dir(args, run_name(model_dir))
    samples_dir = out_dir / "samples"
    seeds = list(range(args.seeds))
    detector = DetectorSettings()

    # 1. Plan the images: the shapes prompts with every seed, and the user's (prompt, seed) rows.
    tasks, info, info_source = [], None, None
    if is_shapes:
        info, info_source = shapes_info(cfg, model_dir)
        tasks = build_tasks(info, quick=args.quick)
    prompts = {p.text: p for task in tasks for p in task.prompts}
    splits, real_data = [], None
    if not is_shapes:  # a dataset of the user's own: its captions, judged by its own CLIP
        from diffusion.evaluation.realdata import read_splits

        try:
            splits, pool = read_splits(cfg, args.captions)
        except UserError as error:
            if rows is None:
                raise
            real_data = {"skipped": str(error)}  # --masks still scores the maps
            print(f"warning: no real-data quality: {error}", file=sys.stderr)
    jobs = plan_jobs(prompts, seeds, rows) + [Job(c, seed) for split in splits for c in split.captions for seed in seeds]
    jobs = list(dict.fromkeys(jobs))

    # 2. Sample what is missing, with maps.
    def load_pipe():
        return TextToImagePipeline.from_run(model_dir, device=args.device)

    sampled, reused = sample_missing(load_pipe, jobs, samples_dir, args, model_dir)
    print(f"{sampled} image(s) sampled, {reused} reused, in {samples_dir}")

    # 3. Detect the objects of every shapes image and locate each named object.
    palette = {c: tuple(v) for c, v in info["palette"].items()} if info else None
    records = [
        ImageRecord.detect(prompt, seed, samples_dir / Job(text, seed).file_name, palette, detector)
        for text, prompt in prompts.items()
        for seed in seeds
    ]

    # 4. Grade the shapes images; score the maps against detected objects and/or the user's masks.
    localisation = []
    if is_shapes:
        fidelity = evaluate_fidelity(tasks, records)
        localisation.append(detector_localisation(records))
    else:
        fidelity = {
            "applies": False,
            "message": f"Prompt fidelity applies to the shapes domain only; this model was trained on {cfg.data.dataset}.",
        }
        if splits:
            real_data = real_data_section(cfg, splits, pool, samples_dir, seeds)
    if rows is not None:
        localisation.append(user_localisation(rows, samples_dir, args.masks))

    s = args.sampler
    results = {
        "model": str(model_dir),
        "run_name": run_name(model_dir),
        "images": len(jobs),
        "settings": {
            "seeds": args.seeds, "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler,
            "quick": args.quick, "layout_guidance": s.layout_guidance,
            "relation_margin_px": RELATION_MARGIN_PX, "detector": detector.to_dict(),
        },
        "dataset_info": info_source,
        "fidelity": fidelity,
        "real_data": real_data,
        "localisation": localisation,
        "per_image": [r.to_dict(out_dir) for r in records],
    }

    # 5. Reports.
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    results["failure_tiles"] = failure_grid(records, out_dir / "failures.png") if is_shapes else 0
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
