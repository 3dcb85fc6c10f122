"""Cost of recording attention maps: sampling time with maps against without, and memory vs steps.

Time: the same prompts and seeds sampled with and without maps (every cross-attention layer,
aggregated over all steps), alternating within each round; the figure is the median of per-round
ratios. Memory: the bytes the aggregator holds after sampling with 25 and with 200 steps, and the
peak resident memory of a fresh process doing each.

    python bench/map_overhead.py --model outputs/runs/cpu [--rounds 5] [--steps 25]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from diffusion.sampling.settings import SamplerSettings
from diffusion.maps.aggregate import AttentionAggregator, MapSettings
from diffusion.sampling.generate import read_prompts_file
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.loop import sample


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def held_bytes(aggregator: AttentionAggregator) -> int:
    tensors = list(aggregator.sums.values()) + list(aggregator.snapshots.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_for_steps(pipe: TextToImagePipeline, prompts: list[str], steps: int) -> int:
    """Bytes held by the aggregator after sampling `steps` steps with maps from every layer."""
    context, mask = pipe.encode(prompts)
    null_context, null_mask = pipe.encode([""])
    aggregator = AttentionAggregator(len(prompts), pipe.unet.config.sample_size, MapSettings())
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    sample(pipe.unet, pipe.scheduler, context, mask, null_context, null_mask, generators, num_steps=steps,
           guidance_scale=SamplerSettings().guidance, hooks=[aggregator])
    aggregator.result()
    return held_bytes(aggregator)


def peak_rss_child(model: str, prompts_file: str, steps: int, maps: bool) -> float:
    """Peak resident memory (MiB) of a fresh process sampling once."""
    code = (
        "import resource, sys; sys.path.insert(0, 'bench');"
        "from map_overhead import child_run;"
        f"child_run({model!r}, {prompts_file!r}, {steps}, {maps});"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def child_run(model: str, prompts_file: str, steps: int, maps: bool) -> None:
    pipe = TextToImagePipeline.from_run(model)
    prompts = read_prompts_file(prompts_file)
    pipe(prompts, list(range(len(prompts))), settings=SamplerSettings(steps=steps, layout_guidance=0), return_attention=maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts-file", default="bench/prompts.txt")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    pipe = TextToImagePipeline.from_run(args.model)
    prompts = read_prompts_file(args.prompts_file)
    seeds = list(range(len(prompts)))
    layers = len(pipe.unet.cross_attention_layers)
    print(f"{len(prompts)} prompts in one batch, {args.steps} DDIM steps, guidance 3, {layers} cross-attention layers, "
          f"{torch.get_num_threads()} threads")

    def plain():
        pipe(prompts, seeds, settings=SamplerSettings(steps=args.steps, layout_guidance=0))

    def recorded():
        pipe(prompts, seeds, settings=SamplerSettings(steps=args.steps, layout_guidance=0), return_attention=True)

    plain(), recorded()  # warm-up
    times = {"without maps": [], "with maps": []}
    for _ in range(args.rounds):
        times["without maps"].append(timed(plain))
        times["with maps"].append(timed(recorded))
    for name, values in times.items():
        print(f"{name:13s}: {statistics.median(values):.3f} s (median of {args.rounds})")
    ratios = [w / p for w, p in zip(times["with maps"], times["without maps"])]
    print(f"overhead: {100 * (statistics.median(ratios) - 1):+.1f}% (median of per-round ratios)")

    for steps in (25, 200):
        held = memory_for_steps(pipe, prompts, steps)
        rss = peak_rss_child(args.model, args.prompts_file, steps, maps=True)
        print(f"{steps:3d} steps: aggregator holds {held / 2**20:.2f} MiB; peak RSS of a fresh sampling process {rss:.0f} MiB")


if __name__ == "__main__":
    main()
