"""Layout guidance strengths on the evaluation's spatial prompts: relation accuracy and sampling time.

For each seed in turn, every strength samples the 16 spatial prompts of the evaluation ("a red circle
left of a blue square", ...) with the default sampler, so the strengths alternate on the same
machine; the detector then grades each image as the evaluation does (exact count, both objects,
relation). Prints, per strength: spatial score, the relation's hit rate where both objects are
right, how many images hold another number of objects, and the median seconds per batch of 16.

    python bench/layout_guidance_sweep.py --model outputs/runs/<run>/model-30min [--strengths 0,0.05] [--seeds 4] [--until 0.3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

from diffusion.evaluation.cli import read_run_config, shapes_info
from diffusion.evaluation.detector import DetectorSettings, detect
from diffusion.evaluation.prompts import build_tasks, check
from diffusion.sampling import layout_guidance, pipeline
from diffusion.sampling.pipeline import TextToImagePipeline, find_model_dir
from diffusion.sampling.settings import SamplerSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--strengths", default="0,0.05", help="comma-separated layout guidance strengths")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--until", type=float, help=f"fraction of the steps guided (default {layout_guidance.UNTIL})")
    args = parser.parse_args()
    if args.until is not None:  # the pipeline builds its LayoutGuidance itself; give it this fraction
        pipeline.LayoutGuidance = functools.partial(layout_guidance.LayoutGuidance, until=args.until)
    strengths = [float(s) for s in args.strengths.split(",")]

    pipe = TextToImagePipeline.from_run(args.model)
    info, _ = shapes_info(read_run_config(find_model_dir(args.model)), find_model_dir(args.model))
    palette = {c: tuple(v) for c, v in info["palette"].items()}
    prompts = next(task.prompts for task in build_tasks(info) if task.name == "spatial")
    verdicts = {s: [] for s in strengths}
    seconds = {s: [] for s in strengths}
    for seed in range(args.seeds):
        for strength in strengths:
            start = time.perf_counter()
            settings = SamplerSettings(layout_guidance=strength)  # the default sampler otherwise
            images = pipe([p.text for p in prompts], [seed] * len(prompts), settings).images
            seconds[strength].append(time.perf_counter() - start)
            for prompt, image in zip(prompts, images):
                verdicts[strength].append(check(prompt, detect(np.asarray(image), palette, DetectorSettings()), "all"))
    for strength in strengths:
        v = verdicts[strength]
        passed = sum(x.passed for x in v)
        objects_right = [x for x in v if x.passed or x.clause == "relation"]
        miscounted = sum(x.clause == "count" for x in v)
        print(
            f"layout guidance {strength:g}: spatial {passed / len(v):.3f} ({passed} of {len(v)}), relation holds in "
            f"{passed} of {len(objects_right)} images with both objects right, {miscounted} with another object count, "
            f"{statistics.median(seconds[strength]):.1f} s per batch of {len(prompts)} (median of {args.seeds})"
        )


if __name__ == "__main__":
    main()
