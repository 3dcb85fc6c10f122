"""A sheet of a dataset-of-your-own evaluation: per caption, the real image, the generated seeds and the word maps
of the first seed, for the first captions of the held-out and the training split (as the evaluation chose them).

    python -m diffusion.evaluation --model outputs/runs/mine --seeds 2          # samples into outputs/eval/mine/samples
    python bench/real_data_sheet.py --model outputs/runs/mine --eval outputs/eval/mine --captions 8 --seeds 2 --out sheet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffusion.evaluation.realdata import read_splits
from diffusion.images import tile
from diffusion.maps.export import overlay
from diffusion.maps.format import read_word_maps
from diffusion.runs import find_model_dir, read_run_config
from diffusion.sampling.generate import Job

TILE, LABEL = 96, 260


def labelled(picture: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (TILE, TILE + 14), "white")
    out.paste(picture.resize((TILE, TILE), Image.NEAREST), (0, 0))
    ImageDraw.Draw(out).text((2, TILE + 1), text[:16], fill="black")
    return out


def caption_cell(text: str) -> Image.Image:
    cell = Image.new("RGB", (LABEL, TILE + 14), "white")
    ImageDraw.Draw(cell).multiline_text((6, 8), "\n".join(text[i : i + 40] for i in range(0, len(text), 40)), fill="black")
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--eval", required=True, help="the evaluation's output folder (its samples/)")
    parser.add_argument("--captions", type=int, default=8, help="captions per split")
    parser.add_argument("--evaluated-captions", type=int, default=100, help="the evaluation's --captions")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = read_run_config(find_model_dir(args.model))
    splits, _ = read_splits(cfg, args.evaluated_captions)
    rows, width = [], 0
    for split in splits:
        rows.append([caption_cell(f"{split.name}:")])
        for caption, real in list(zip(split.captions, split.real))[: args.captions]:
            paths = [Path(args.eval) / "samples" / Job(caption, s).file_name for s in range(args.seeds)]
            words, maps = read_word_maps(paths[0])
            generated = [Image.open(p).convert("RGB") for p in paths]
            row = [caption_cell(caption), labelled(real, "real")]
            row += [labelled(image, f"seed {s}") for s, image in enumerate(generated)]
            row += [labelled(overlay(generated[0], torch.from_numpy(m)), w) for w, m in zip(words, maps)]
            rows.append(row)
            width = max(width, len(row))
    cells = [cell for row in rows for cell in row + [Image.new("RGB", (1, 1), "white")] * (width - len(row))]
    tile(cells, columns=width).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
