"""Seconds from a request to its page in the live demo (python -m diffusion.demo), at sample.py's defaults.

    python bench/demo_latency.py --model outputs/runs/cpu [--rounds 5]

Times Demo.page (sampling, writing the images and maps, building the viewer's page) for one prompt and
for two side by side, alternating; prints the medians and the page size.
"""

from __future__ import annotations

import argparse
import statistics
import time

from diffusion.demo import Demo
from diffusion.sampling.settings import SamplerSettings

PROMPT, COMPARE = "a red circle left of a blue square", "a red circle right of a blue square"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/runs/cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    demo, settings = Demo(args.model), SamplerSettings()
    cases = {"one prompt": (PROMPT, ""), "two prompts": (PROMPT, COMPARE)}
    demo.page(PROMPT, "", 0, settings)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in cases}
    sizes = {}
    for r in range(args.rounds):
        for name in cases if r % 2 == 0 else reversed(cases):
            start = time.perf_counter()
            page, _ = demo.page(*cases[name], r, settings)
            times[name].append(time.perf_counter() - start)
            sizes[name] = len(page)
    print(f"{settings}; medians of {args.rounds}")
    for name in cases:
        print(f"{name}: {statistics.median(times[name]):.2f} s per request, page {sizes[name] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
