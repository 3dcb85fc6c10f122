"""Tiling pictures into one (validation grids, map grids, failure sheets, benchmark sheets)."""

from __future__ import annotations

from PIL import Image


def tile(images: list[Image.Image], columns: int, background: str | tuple[int, int, int] = "white") -> Image.Image:
    """Images in rows of `columns`, left to right, top to bottom. Each column is as wide as its widest
    image and each row as tall as its tallest, so equal images make a plain grid."""
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    widths = [max(row[c].width for row in rows if c < len(row)) for c in range(min(columns, len(images)))]
    heights = [max(image.height for image in row) for row in rows]
    grid = Image.new("RGB", (sum(widths), sum(heights)), background)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (sum(widths[:c]), sum(heights[:r])))
    return grid
