"""Tile sampled images into one grid: a row per prompt, a column per seed, prompt written on the left.

    python bench/sample_grid.py SAMPLES_DIR PROMPTS_FILE NUM_SEEDS OUT.png
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from diffusion.generate import Job, read_prompts_file

TILE, LABEL = 96, 300


def main() -> None:
    samples, prompts_file, num_seeds, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    prompts = read_prompts_file(prompts_file)
    grid = Image.new("RGB", (LABEL + TILE * num_seeds, TILE * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(prompts):
        draw.text((6, row * TILE + TILE // 2 - 6), prompt, fill="black")
        for seed in range(num_seeds):
            image = Image.open(samples / Job(prompt, seed).file_name).resize((TILE, TILE), Image.NEAREST)
            grid.paste(image, (LABEL + seed * TILE, row * TILE))
    grid.save(out)


if __name__ == "__main__":
    main()
