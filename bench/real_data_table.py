"""One markdown table of dataset-of-your-own evaluations: per run, its steps and, per split, the generated images'
R-precision and KID beside the real images' R-precision (the ceiling).

    python bench/real_data_table.py outputs/runs/study-10min-default outputs/runs/study-10min-wide
    python bench/real_data_table.py RUN ... --eval-root outputs/eval     (evaluations in <root>/<run name>)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusion.runs import find_model_dir, read_training_info


def row(run: Path, eval_root: Path) -> str:
    info = read_training_info(find_model_dir(run))
    results = json.loads((eval_root / run.name / "results.json").read_text())
    cells = [run.name, f"{info['step']:,}"]
    for split in results["real_data"]["splits"]:
        generated, real = split["rows"]["generated"], split["rows"]["real"]
        ratio = generated["r_precision"] / real["r_precision"] if real["r_precision"] else float("nan")
        cells += [f"{generated['r_precision']:.3f} ({ratio:.0%} of {real['r_precision']:.3f})",
                  f"{generated['kid_x1000']:.1f}" + (f" ± {generated['kid_std']:.1f}" if generated["kid_std"] >= 0.05 else "")]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--eval-root", type=Path, default=Path("outputs/eval"))
    args = parser.parse_args()
    first = json.loads((args.eval_root / args.runs[0].name / "results.json").read_text())["real_data"]["splits"]
    header = ["run", "steps"]
    for split in first:
        header += [f"{split['split']}: R-precision (of real)", f"{split['split']}: KID x 1000"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for run in args.runs:
        print(row(run, args.eval_root))


if __name__ == "__main__":
    main()
