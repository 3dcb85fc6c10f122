"""The built-in "shapes" dataset: procedural captioned scenes of flat-coloured shapes.

Each image shows 1..3 non-overlapping shapes (circle, square, triangle, star) in palette
colours on a white background, with a caption that states exactly what is there:

    "a red circle"
    "a small green star left of a large blue square"
    "a red circle above a purple triangle and a small blue star right of the purple triangle"

Some compositions are held out of the train split (colour-shape pairs such as "red
triangle", relation patterns such as "circle above square", held out in both phrasings:
no training caption says "square below circle" either); the test split is drawn from
the full distribution and flags those rows `held_out: true`, so generalisation to unseen
compositions can be measured.

Rendering has no anti-aliasing, so per-object masks are exact and every pixel of object k
has exactly its palette colour. The dataset is written in the Hugging Face `imagefolder`
layout, which `diffusion.data.folder.CaptionedImageFolder` reads like any user folder.
Scenes and their captions are drawn in `diffusion.data.scenes`; this module renders and writes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffusion.data.relations import RELATIONS
from diffusion.data.scenes import MAX_SCENE_DRAWS, Scene, SceneObject, caption_words, is_held_out, sample_scene
from diffusion.data.vocabulary import (
    BACKGROUND, PALETTE, SIZE_FRACTIONS, ShapesConfig, parse_pair, parse_relation_pattern, with_converses,
)
from diffusion.files import atomic_dir, config_hash

SQUARE_HALF_SIDE = 0.85  # square half-side / half-extent, so a square looks as big as a circle
STAR_POINTS = 5
STAR_INNER_RADIUS = 0.55  # inner / outer radius; chunkier than a pentagram so it survives 32 px
PNG_COMPRESS_LEVEL = 1
# Of the written files. 2: rows carry word_objects (which caption word names which mask); 3: a held-out relation
# pattern holds out its converse phrasing too ("circle above square" and "square below circle").
FORMAT_VERSION = 3


# ---------------------------------------------------------------------------------------------
# Rasterisation
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y coordinates of pixel centres, each (S, S)."""
    coords = np.arange(image_size, dtype=np.float64) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    return xs, ys


def inside_circle(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return dx * dx + dy * dy <= r * r


def inside_square(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    half_side = SQUARE_HALF_SIDE * r
    return (np.abs(dx) <= half_side) & (np.abs(dy) <= half_side)


def inside_triangle(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Apex at the top centre, base along the bottom of the box."""
    return (dy <= r) & (2 * np.abs(dx) <= dy + r)


def inside_star(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """A STAR_POINTS-pointed star, one point straight up, as wide as the box and touching its top."""
    sector = 2 * np.pi / STAR_POINTS
    outer = r / np.sin(sector)  # outer radius at which the side points reach x = +-r
    dy = dy + r - outer  # move the centre down so the top point sits on the box's top edge
    # 1. Angle from the nearest outer point, folded into [0, sector / 2].
    angle = np.mod(np.arctan2(dy, dx) + np.pi / 2, sector)
    angle = np.minimum(angle, sector - angle)
    rho = np.hypot(dx, dy)
    px, py = rho * np.cos(angle), rho * np.sin(angle)
    # 2. The edge from the outer point (outer, 0) to the inner point at angle sector / 2.
    inner = STAR_INNER_RADIUS * outer
    ix, iy = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # 3. Inside when on the centre's side of that edge (cross product sign).
    cross = (ix - outer) * py - iy * (px - outer)
    return cross >= 0


INSIDE_TESTS = {
    "circle": inside_circle,
    "square": inside_square,
    "triangle": inside_triangle,
    "star": inside_star,
}


def object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """Boolean (S, S): the pixels whose centres lie inside the object."""
    xs, ys = pixel_centres(image_size)
    return INSIDE_TESTS[obj.shape](xs - obj.centre[0], ys - obj.centre[1], obj.half_extent)


def render_scene(objects: Sequence[SceneObject], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat-coloured objects on white: rgb uint8 (S, S, 3) and mask uint8 (S, S).

    mask is 0 on the background and k (1-based) on object k's pixels; later objects paint over
    earlier ones if they overlap (generated scenes never overlap).
    """
    rgb = np.empty((image_size, image_size, 3), dtype=np.uint8)
    rgb[:] = BACKGROUND
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for k, obj in enumerate(objects, start=1):
        inside = object_mask(obj, image_size)  # (S, S)
        rgb[inside] = PALETTE[obj.colour]
        mask[inside] = k
    return rgb, mask


def mask_bbox(mask: np.ndarray, value: int) -> list[int]:
    """[x0, y0, x1, y1] of the pixels equal to value; x1, y1 exclusive (slice-style)."""
    ys, xs = np.nonzero(mask == value)
    if len(xs) == 0:
        raise ValueError(f"mask has no pixels with value {value}")
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ---------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    pairs: set[tuple[str, str]]
    patterns: set[tuple[str, str, str]]

    @classmethod
    def from_config(cls, cfg: ShapesConfig) -> HeldOut:
        return cls(
            pairs={parse_pair(p, cfg.colours, cfg.shapes) for p in cfg.held_out_pairs},
            patterns={parse_relation_pattern(p, cfg.shapes) for p in with_converses(cfg.held_out_relations, cfg.shapes)},
        )


def draw_split_scene(cfg: ShapesConfig, held_out: HeldOut, rng: np.random.Generator, train: bool) -> tuple[Scene, bool]:
    """A placeable scene and whether it is held out; train scenes never are.

    The object count is drawn once, uniformly, then contents are redrawn until they fit (and,
    for train, avoid held-out compositions), so rejection does not skew the count.
    """
    num_objects = int(rng.integers(1, cfg.max_objects + 1))
    for _ in range(MAX_SCENE_DRAWS):
        scene = sample_scene(cfg, num_objects, rng)
        if scene is None:
            continue
        flagged = is_held_out(scene, held_out.pairs, held_out.patterns)
        if not (train and flagged):
            return scene, flagged
    raise RuntimeError(
        f"could not draw a valid {num_objects}-object scene in {MAX_SCENE_DRAWS} tries; "
        "hold out fewer compositions, allow more colours/shapes or lower max_objects"
    )


def metadata_row(index: int, scene: Scene, mask: np.ndarray, held_out: bool) -> dict:
    words = caption_words(scene)
    return {
        "file_name": f"images/{index:06d}.png",
        "text": " ".join(word for word, _ in words),  # = caption(scene)
        "word_objects": [k for _, k in words],  # per caption word: the mask value it names, or 0
        "objects": [
            {
                "shape": obj.shape,
                "colour": obj.colour,
                "size": obj.size,
                "bbox": mask_bbox(mask, k),
                "mask_value": k,
            }
            for k, obj in enumerate(scene.objects, start=1)
        ],
        "relations": [asdict(rel) for rel in scene.relations],
        "mask_file": f"masks/{index:06d}.png",
        "held_out": held_out,
    }


def write_split(
    cfg: ShapesConfig, split_dir: Path, count: int, rng: np.random.Generator, train: bool, bar: tqdm
) -> int:
    """Render and save `count` scenes into split_dir; returns how many rows are held out."""
    held_out = HeldOut.from_config(cfg)
    (split_dir / "images").mkdir(parents=True)
    (split_dir / "masks").mkdir()
    num_held_out = 0
    with open(split_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for index in range(count):
            scene, flagged = draw_split_scene(cfg, held_out, rng, train)
            rgb, mask = render_scene(scene.objects, cfg.image_size)
            row = metadata_row(index, scene, mask, flagged)
            Image.fromarray(rgb).save(split_dir / row["file_name"], compress_level=PNG_COMPRESS_LEVEL)
            Image.fromarray(mask).save(split_dir / row["mask_file"], compress_level=PNG_COMPRESS_LEVEL)
            metadata.write(json.dumps(row) + "\n")
            num_held_out += flagged
            bar.update(1)
    return num_held_out


def dataset_info(cfg: ShapesConfig, num_test_held_out: int) -> dict:
    return {
        "name": "shapes",
        "format_version": FORMAT_VERSION,
        "config": asdict(cfg),
        "palette": {c: list(PALETTE[c]) for c in cfg.colours},
        "background": list(BACKGROUND),
        "held_out_pairs": list(cfg.held_out_pairs),
        "held_out_relations": with_converses(cfg.held_out_relations, cfg.shapes),  # both phrasings of each scene
        "relations": list(RELATIONS),
        "size_fractions": dict(SIZE_FRACTIONS),
        "bbox_format": "[x0, y0, x1, y1] in pixels, x1 and y1 exclusive",
        "counts": {"train": cfg.num_train, "test": cfg.num_test, "test_held_out": num_test_held_out},
    }


def shapes_dir(cfg: ShapesConfig, cache_dir: Path) -> Path:
    """Where the dataset of `cfg` is cached: <cache_dir>/datasets/shapes-<hash of cfg and FORMAT_VERSION>."""
    return Path(cache_dir) / "datasets" / f"shapes-{config_hash(asdict(cfg), {'format': FORMAT_VERSION})}"


def generate_shapes(cfg: ShapesConfig, out_dir: Path, progress: bool = True) -> Path:
    """Write the dataset to out_dir (train/, test/, dataset_info.json) and return out_dir.

    Reproducible bit-for-bit for a seed. Train and test use separate generators seeded by
    (seed, split), so changing num_train leaves the test split unchanged. Everything is
    written to a temporary sibling folder first and moved into place at the end.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; refusing to overwrite it. "
            "Delete it or choose another output folder."
        )
    with atomic_dir(out_dir) as staging:
        with tqdm(total=cfg.num_train + cfg.num_test, desc="shapes", unit="img", disable=not progress) as bar:
            write_split(cfg, staging / "train", cfg.num_train, np.random.default_rng([cfg.seed, 0]), True, bar)
            num_test_held_out = write_split(
                cfg, staging / "test", cfg.num_test, np.random.default_rng([cfg.seed, 1]), False, bar
            )
        info = dataset_info(cfg, num_test_held_out)
        (staging / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir
