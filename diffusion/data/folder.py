"""Captioned image folders in the Hugging Face `imagefolder` layout.

A folder holds image files plus a `metadata.jsonl` with one JSON object per line:

    {"file_name": "images/000000.png", "text": "a red circle left of a blue square"}

`file_name` is relative to the folder; the caption column is configurable. The built-in
shapes dataset (`diffusion.data.shapes`) writes exactly this layout, so user data and shapes
take the same path. All images are decoded once at construction into one uint8 tensor, which
keeps CPU training fast: in memory, or for a set larger than MEMORY_LIMIT bytes (50,000 images at
64 px are 600 MB) in a file on disk mapped into memory, so that only the pages in use take RAM.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffusion.errors import UserError

METADATA_FILE = "metadata.jsonl"
PROGRESS_MIN_IMAGES = 2000  # show a progress bar when decoding more images than this
SKIP_HINT = "or set data.skip_bad_rows: true to skip such rows"
LEFT_RIGHT = re.compile(r"\b(left|right)\b")
MEMORY_LIMIT = 1 << 30  # bytes of decoded images held in memory; a larger set goes to a mapped file on disk


class DatasetError(UserError, ValueError):
    """A captioned image folder that cannot be read; the message names the file, row and fix."""


class BadRow(Exception):
    """One unusable metadata row; `reason` is the short name used when counting skipped rows."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def swap_left_right(caption: str) -> str:
    """"a star left of a circle" -> "a star right of a circle" (whole words only)."""
    return LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


def resize_and_centre_crop(
    image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """Scale the shorter side to `size` (bicubic by default), then crop the centre square."""
    width, height = image.size
    if min(width, height) != size:
        scale = size / min(width, height)
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((width, height), resample)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (as icons and emoji are drawn), not on black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3) RGB; raises OSError (or PIL's subclasses) for unreadable files."""
    with Image.open(path) as image:
        rgb = to_rgb(image)
    return np.asarray(resize_and_centre_crop(rgb, size), dtype=np.uint8)


def parse_row(line: str, caption_column: str) -> dict:
    """The row as a dict with a file_name and a non-empty caption, or BadRow."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRow("bad JSON", f"is not valid JSON ({err.msg}); write one JSON object per line") from None
    if not isinstance(row, dict):
        raise BadRow("bad JSON", f"is a JSON {type(row).__name__}, not an object; write one JSON object per line")
    if not isinstance(row.get("file_name"), str) or not row["file_name"]:
        raise BadRow("missing file_name", f"has no 'file_name' (columns: {sorted(row)}); add the image's relative path")
    caption = row.get(caption_column)
    if caption is None:
        raise BadRow(
            "missing caption",
            f"has no caption column {caption_column!r} (columns: {sorted(row)}); "
            "add it, or set data.caption_column to the column that holds the captions",
        )
    captions = caption if isinstance(caption, list) else [caption]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise BadRow(
            "empty caption",
            f"has an empty or non-text caption in {caption_column!r}: {caption!r}; write one (or a list of several)",
        )
    return row


def row_captions(row: dict, caption_column: str) -> tuple[str, ...]:
    """A parsed row's captions: one, or several (a list in the caption column, one drawn per use)."""
    caption = row[caption_column]
    return tuple(c.strip() for c in (caption if isinstance(caption, list) else [caption]))


GROUNDING_FORMAT = (
    "a 'mask_file' (a PNG whose pixel value k marks object k, 0 the background) and 'word_objects' "
    "(for each whitespace-separated caption word, the object k it names, or 0)"
)


def load_mask(path: Path, size: int, grey: bool = False) -> np.ndarray:
    """uint8 (size, size), resized like the images but with nearest-neighbour sampling: object ids (pixel value
    k marks object k; a mask of mode L, P or 1), or with `grey` the grey levels of a picture in any mode."""
    with Image.open(path) as mask:
        if not grey and mask.mode not in ("L", "P", "1"):
            raise BadRow("bad mask", f"has mask file {path} in mode {mask.mode}; save it as 8-bit greyscale (mode L)")
        values = mask.convert("L") if grey or mask.mode == "1" else mask.copy()
    return np.asarray(resize_and_centre_crop(values, size, Image.Resampling.NEAREST), dtype=np.uint8)


@dataclass
class Batch:
    """Rows of a CaptionedImageFolder, mirrored consistently when hflip is on."""

    pixels: torch.Tensor  # (B, 3, S, S) float32 in [-1, 1]
    captions: list[str]
    masks: torch.Tensor | None = None  # (B, S, S) uint8 object ids, 0 = background (folders loaded with masks)
    word_objects: list[list[int]] | None = None  # per caption word, the object id it names (0: none)


def has_grounding(root: str | Path) -> bool:
    """Whether any row of root/metadata.jsonl names a mask and its word_objects (the grounding columns)."""
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        return False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # CaptionedImageFolder names bad rows when it reads them
        if isinstance(row, dict) and "mask_file" in row and "word_objects" in row:
            return True
    return False


def image_store(rows: int, size: int, spill_dir: str | Path | None = None) -> tuple[np.ndarray, str]:
    """Room for `rows` decoded images, uint8 (rows, 3, S, S), and where it is, in words: an array in memory, or
    past MEMORY_LIMIT a file in `spill_dir` (default: the system's temporary folder) mapped into memory,
    which the system deletes once it is closed."""
    shape = (rows, 3, size, size)
    megabytes = rows * 3 * size * size / 1e6
    if rows * 3 * size * size <= MEMORY_LIMIT:
        return np.empty(shape, dtype=np.uint8), f"decoded in memory ({megabytes:,.0f} MB)"
    folder = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    spill = tempfile.TemporaryFile(dir=folder, prefix="decoded-images-")
    where = f"decoded into a file in {folder} mapped into memory ({megabytes:,.0f} MB: more than {MEMORY_LIMIT / 1e6:,.0f} MB)"
    return np.memmap(spill, dtype=np.uint8, mode="w+", shape=shape), where


class CaptionedImageFolder(Dataset):
    """Images and captions from `root/metadata.jsonl`, decoded once (into memory, or a mapped file; image_store).

    Items are {"pixel_values": float32 (3, S, S) in [-1, 1], "caption": str, "index": int}.

    With masks=True every row must also ground its caption (for the grounding loss): a mask PNG
    with one id per object and, per caption word, the id of the object it names, e.g.
        {"file_name": "images/0.png", "text": "a red circle", "mask_file": "masks/0.png", "word_objects": [0, 1, 1]}

    hflip is off by default because captions speak of left and right and a mirrored image
    would make them false. With hflip=True an item is mirrored with probability 0.5 (torch's
    global RNG) and the words "left" and "right" in its caption are swapped to match.

    Bad rows (bad JSON, missing/empty caption, missing or unreadable image) raise
    DatasetError naming the file and the 1-based line; with skip_bad_rows=True they are
    skipped, counted per reason in `skipped_reasons`, and reported once as a warning.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        caption_column: str = "text",
        skip_bad_rows: bool = False,
        hflip: bool = False,
        progress: bool = True,
        masks: bool = False,
        spill_dir: str | Path | None = None,
    ):
        self.root = Path(root)
        self.with_masks = masks
        self.image_size = image_size
        self.caption_column = caption_column
        self.skip_bad_rows = skip_bad_rows
        self.hflip = hflip
        self.metadata_path = self.root / METADATA_FILE
        self.progress = progress

        lines = self.read_metadata_lines()
        self.rows: list[dict] = []  # raw metadata of the kept rows, e.g. ground-truth objects
        self.caption_sets: list[tuple[str, ...]] = []  # each row's captions: one, or several to draw from
        self.word_objects: list[list[int]] = []  # filled with masks=True
        self.skipped_reasons: Counter[str] = Counter()
        masks: list[np.ndarray] = []
        store, self.storage = image_store(len(lines), image_size, spill_dir)  # (rows, 3, S, S) uint8
        kept = self.decode_rows(lines, masks, store)
        self.images = torch.from_numpy(store[:kept])  # (N, 3, S, S) uint8
        self.masks = torch.from_numpy(np.stack(masks)) if masks else None  # (N, S, S) uint8
        self.report_skipped(len(lines))

    @property
    def skipped(self) -> int:
        return sum(self.skipped_reasons.values())

    # -- construction ------------------------------------------------------------------------

    def read_metadata_lines(self) -> list[tuple[int, str]]:
        """(1-based line number, text) of every non-blank line of metadata.jsonl."""
        if not self.metadata_path.is_file():
            raise DatasetError(self.missing_metadata_message())
        text = self.metadata_path.read_text(encoding="utf-8")
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not lines:
            raise DatasetError(f"{self.metadata_path} has no rows; add one JSON object per image")
        return lines

    def missing_metadata_message(self) -> str:
        message = (
            f"{self.root} has no {METADATA_FILE}. A captioned image folder needs image files plus a "
            f"{METADATA_FILE} with one JSON object per line holding 'file_name' (the image path relative "
            f"to the folder) and {self.caption_column!r} (the caption), e.g. "
            f'{{"file_name": "images/0001.png", "{self.caption_column}": "a red circle"}}'
        )
        splits = [s for s in ("train", "test") if (self.root / s / METADATA_FILE).is_file()]
        if splits:
            message += f". Found {METADATA_FILE} in {', '.join(splits)}/: point at {self.root / splits[0]} instead"
        return message

    def decode_rows(self, lines: list[tuple[int, str]], masks: list[np.ndarray], store: np.ndarray) -> int:
        """Decode every row's image into `store` (rows, 3, S, S) and, with masks on, its mask (appended to
        `masks`); returns the number of rows kept."""
        kept = 0
        bar = tqdm(lines, desc=f"loading {self.root.name}", unit="img", disable=not self.progress or len(lines) <= PROGRESS_MIN_IMAGES)
        for number, line in bar:
            try:
                row, image = self.decode_row(line)
                mask = self.decode_grounding(row) if self.with_masks else None
            except BadRow as bad:
                if not self.skip_bad_rows:
                    raise DatasetError(f"{self.metadata_path}, row {number} {bad}, {SKIP_HINT}") from None
                self.skipped_reasons[bad.reason] += 1
                continue
            self.rows.append(row)
            self.caption_sets.append(row_captions(row, self.caption_column))
            store[kept] = image.transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)
            kept += 1
            if mask is not None:
                masks.append(mask)
                self.word_objects.append(row["word_objects"])
        if not kept:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped_reasons.items())
            raise DatasetError(f"{self.metadata_path}: every row is unusable ({reasons}); nothing to load")
        return kept

    def decode_row(self, line: str) -> tuple[dict, np.ndarray]:
        row = parse_row(line, self.caption_column)
        path = self.root / row["file_name"]
        if not path.is_file():
            raise BadRow(
                "missing image", f"names image file {path}, which does not exist; fix 'file_name' or add the image"
            )
        try:
            image = load_image(path, self.image_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise BadRow(
                "unreadable image", f"names image file {path}, which cannot be read as an image ({err}); replace it"
            ) from None
        return row, image

    def decode_grounding(self, row: dict) -> np.ndarray:
        """The row's mask, after checking its word_objects against the caption; or BadRow."""
        if isinstance(row[self.caption_column], list):
            raise BadRow("bad word_objects", "has several captions; word_objects can ground one caption only: give it one")
        if "mask_file" not in row or "word_objects" not in row:
            raise BadRow("no grounding", f"has no grounding; the grounding loss needs {GROUNDING_FORMAT}, or set train.grounding_weight: 0")
        words = row[self.caption_column].split()
        objects = row["word_objects"]
        if not (isinstance(objects, list) and len(objects) == len(words) and all(isinstance(k, int) and 0 <= k < 256 for k in objects)):
            raise BadRow(
                "bad word_objects",
                f"has word_objects {objects!r}, which must list one object id (0-255) per caption word ({len(words)} words)",
            )
        path = self.root / row["mask_file"]
        try:
            return load_mask(path, self.image_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise BadRow("unreadable mask", f"names mask file {path}, which cannot be read ({err}); fix 'mask_file'") from None

    def report_skipped(self, num_rows: int) -> None:
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_reasons.items()))
            warnings.warn(f"{self.metadata_path}: skipped {self.skipped} of {num_rows} rows ({reasons})", stacklevel=3)

    # -- access ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.caption_sets)

    def __getitem__(self, index: int) -> dict:
        batch = self.batch(torch.tensor([index]))
        return {"pixel_values": batch.pixels[0], "caption": batch.captions[0], "index": index}

    @cached_property
    def captions(self) -> list[str]:
        """Each row's caption (its first, where it has several)."""
        return [captions[0] for captions in self.caption_sets]

    @property
    def all_captions(self) -> list[str]:
        """Every distinct caption a batch can hold (before hflip's swaps), in row order."""
        return list(dict.fromkeys(c for captions in self.caption_sets for c in captions))

    @cached_property
    def num_objects(self) -> int:
        """1 + the largest object id that the masks or word_objects hold (0 without masks): a bound on every
        batch's ids, fixed once, so that no training step has to read a batch's masks back to find it."""
        if self.masks is None:
            return 0
        largest_named = max((max(objects, default=0) for objects in self.word_objects), default=0)
        return max(int(self.masks.max()) if len(self.masks) else 0, largest_named) + 1

    def draw_caption(self, row: int) -> str:
        """The row's caption, or one of its several drawn at random (torch's global RNG)."""
        captions = self.caption_sets[row]
        return captions[0] if len(captions) == 1 else captions[int(torch.randint(len(captions), ()))]

    def batch(self, rows: torch.Tensor) -> Batch:
        """Many items at once: pixels float32 (B, 3, S, S) in [-1, 1], captions and (if loaded) masks."""
        pixels = self.images[rows].float() / 127.5 - 1.0  # (B, 3, S, S)
        captions = [self.draw_caption(i) for i in rows.tolist()]
        masks = None if self.masks is None else self.masks[rows]  # (B, S, S)
        word_objects = [self.word_objects[i] for i in rows.tolist()] if self.masks is not None else None
        if self.hflip:
            # Mirroring keeps every word in place ("left" <-> "right"), so word_objects stay valid.
            flipped = torch.rand(len(captions)) < 0.5
            pixels[flipped] = pixels[flipped].flip(-1)
            if masks is not None:
                masks[flipped] = masks[flipped].flip(-1)
            captions = [swap_left_right(c) if f else c for c, f in zip(captions, flipped.tolist())]
        return Batch(pixels, captions, masks, word_objects)
