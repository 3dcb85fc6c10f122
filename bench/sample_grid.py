"""Tile sampled images into one sheet: a row per prompt, a column per seed, the prompt written on the left.

    python bench/sample_grid.py SAMPLES_DIR PROMPTS_FILE NUM_SEEDS OUT.png
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from diffusion.images import tile
from diffusion.sampling.generate import Job, read_prompts_file

TILE, LABEL = 96, 300


def label(text: str) -> Image.Image:
    picture = Image.new("RGB", (LABEL, TILE), "white")
    ImageDraw.Draw(picture).text((6, TILE // 2 - 6), text, fill="black")
    return picture


def main() -> None:
    samples, prompts_file, num_seeds, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cells = []
    for prompt in read_prompts_file(prompts_file):
        cells.append(label(prompt))
        cells += [Image.open(samples / Job(prompt, s).file_name).resize((TILE, TILE), Image.NEAREST) for s in range(num_seeds)]
    tile(cells, columns=1 + num_seeds).save(out)


if __name__ == "__main__":
    main()
