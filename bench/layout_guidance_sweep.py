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
import statistics
import time

import numpy as np

from diffusion.evaluation.detector import DetectorSettings, detect
from diffusion.evaluation.prompts import build_tasks, check
from diffusion.runs import find_model_dir, read_run_config, shapes_info
from diffusion.sampling.layout_guidance import UNTIL
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.settings import SamplerSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--strengths", default="0,0.05", help="comma-separated layout guidance strengths")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--until", type=float, default=UNTIL, help=f"fraction of the steps guided (default {UNTIL})")
    args = parser.parse_args()
    strengths = [float(s) for s in args.strengths.split(",")]

    pipe = TextToImagePipeline.from_run(args.model)
    info, _ = shapes_info(read_run_config(find_model_dir(args.model)), find_model_dir(args.model))
    palette = {c: tuple(v) for c, v in info["palette"].items()}
    prompts = next(task.prompts for task in build_tasks(info) if task.name == "spatial")
    texts = [p.text for p in prompts]
    # The default sampler, without its layout guidance: the sweep adds its own, guiding --until of the steps.
    settings = SamplerSettings(layout_guidance=0.0)
    verdicts = {s: [] for s in strengths}
    seconds = {s: [] for s in strengths}
    for seed in range(args.seeds):
        for strength in strengths:
            start = time.perf_counter()
            guidance = pipe.layout_guidance(texts, strength, settings.steps, until=args.until)
            images = pipe(texts, [seed] * len(prompts), settings, hooks=[guidance]).images
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
