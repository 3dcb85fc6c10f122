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

from diffusion.config import ShapesConfig
from diffusion.files import atomic_dir
from diffusion.data.vocabulary import (
    BACKGROUND,
    PALETTE,
    SIZE_FRACTIONS,
    SIZE_WORDS,
    parse_pair,
    parse_relation_pattern,
    with_converses,
)
from diffusion.text.relations import RELATION_AXES, RELATIONS

SEPARATION_PX = 2.0  # minimum gap between nominal boxes: leaves >= 1 empty pixel between masks
PLACEMENT_TRIES = 16  # candidate placements drawn at once for one scene
MAX_SCENE_DRAWS = 1000  # give up (config error) if no valid scene turns up in this many draws
SQUARE_HALF_SIDE = 0.85  # square half-side / half-extent, so a square looks as big as a circle
STAR_POINTS = 5
STAR_INNER_RADIUS = 0.55  # inner / outer radius; chunkier than a pentagram so it survives 32 px
PNG_COMPRESS_LEVEL = 1
# Of the written files. 2: rows carry word_objects (which caption word names which mask); 3: a held-out relation
# pattern holds out its converse phrasing too ("circle above square" and "square below circle").
FORMAT_VERSION = 3


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    centre: tuple[float, float]  # (x, y) in pixels, origin top-left
    half_extent: float  # the shape fits inside centre +- half_extent on both axes


@dataclass(frozen=True)
class Relation:
    """objects[subject] <relation> objects[reference], e.g. 0 "left of" 1."""

    subject: int
    relation: str
    reference: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relations: tuple[Relation, ...]


def relation_skeleton(num_objects: int, rng: np.random.Generator) -> tuple[Relation, ...]:
    """Which relations a caption states: none, "A rel B", or "A rel B and C rel B".

    Object 1 (B) is the shared reference, so every object takes part in a stated relation.
    """
    return skeleton_relations([RELATIONS[k] for k in rng.integers(len(RELATIONS), size=num_objects - 1)])


def skeleton_relations(words: list[str] | tuple[str, ...]) -> tuple[Relation, ...]:
    """The skeleton's relations for these relation words: object 0, then object 2, each against object 1."""
    return tuple(Relation(subject, word, 1) for subject, word in zip((0, 2), words))


def ordered(rel: Relation) -> tuple[int, int, int]:
    """(axis, first, second): the relation says objects[first] ends before objects[second] starts."""
    axis, subject_first = RELATION_AXES[rel.relation]
    return (axis, rel.subject, rel.reference) if subject_first else (axis, rel.reference, rel.subject)


def draw_ordered_pair(
    coords: np.ndarray, half: np.ndarray, first: int, second: int, image_size: int, rng: np.random.Generator
) -> bool:
    """Redraw coords (T, n) of first and second so first ends SEPARATION_PX before second starts.

    Uniform over all such arrangements along the axis; False when they cannot fit at all.
    """
    room = image_size - 2 * half[first] - 2 * half[second] - SEPARATION_PX  # free length on the axis
    if room < 0:
        return False
    starts = np.sort(rng.random((len(coords), 2)) * room, axis=1)  # (T, 2)
    coords[:, first] = starts[:, 0] + half[first]
    coords[:, second] = starts[:, 1] + 2 * half[first] + SEPARATION_PX + half[second]
    return True


def draw_beside(
    coords: np.ndarray, half: np.ndarray, anchor: int, mover: int, before: bool, image_size: int,
    rng: np.random.Generator,
) -> None:
    """Redraw coords (T, n) of mover uniformly on one side of the already placed anchor.

    Where that side has no room the result is left invalid for place_objects to reject.
    """
    reach = half[anchor] + SEPARATION_PX + half[mover]  # closest allowed centre distance
    if before:
        low, high = np.full(len(coords), half[mover]), coords[:, anchor] - reach
    else:
        low, high = coords[:, anchor] + reach, np.full(len(coords), image_size - half[mover])
    coords[:, mover] = low + rng.random(len(coords)) * np.maximum(high - low, 0)


def placement_is_valid(
    centres: np.ndarray, half: np.ndarray, relations: tuple[Relation, ...], image_size: int
) -> np.ndarray:
    """(T,) bool: inside the image, no two nominal boxes closer than SEPARATION_PX, relations true."""
    box_lo = centres - half[None, :, None]  # (T, n, 2)
    box_hi = centres + half[None, :, None]
    valid = ((box_lo >= 0) & (box_hi <= image_size)).all(axis=(1, 2))
    n = len(half)
    for i in range(n):
        for j in range(i + 1, n):
            gap = np.maximum(box_lo[:, j] - box_hi[:, i], box_lo[:, i] - box_hi[:, j])  # (T, 2)
            valid &= (gap >= SEPARATION_PX).any(axis=1)
    for rel in relations:
        axis, first, second = ordered(rel)
        valid &= box_lo[:, second, axis] - box_hi[:, first, axis] >= SEPARATION_PX
    return valid


def place_objects(
    half_extents: np.ndarray, relations: tuple[Relation, ...], image_size: int, rng: np.random.Generator
) -> np.ndarray | None:
    """Centres (n, 2) with every object inside the image, none touching, every relation true; or None.

    PLACEMENT_TRIES candidates are drawn at once:
    1. every object starts uniformly anywhere in the image;
    2. each relation redraws coordinates on its axis: a pair with neither object placed yet is
       drawn jointly in the stated order, an object related to a placed one is drawn on the
       stated side of it;
    3. centres are rounded to whole pixels, so every shape is rasterised symmetrically;
    4. candidates that overlap or lack room are rejected and the first valid one is kept.
    """
    num_tries, n = PLACEMENT_TRIES, len(half_extents)
    half = half_extents[None, :, None]  # (1, n, 1)
    centres = half + rng.random((num_tries, n, 2)) * (image_size - 2 * half)  # (T, n, 2)
    placed: set[int] = set()
    for rel in relations:
        axis, first, second = ordered(rel)
        coords = centres[:, :, axis]  # (T, n) view
        if first not in placed and second not in placed:
            if not draw_ordered_pair(coords, half_extents, first, second, image_size, rng):
                return None
        elif first in placed and second not in placed:
            draw_beside(coords, half_extents, anchor=first, mover=second, before=False, image_size=image_size, rng=rng)
        elif second in placed and first not in placed:
            draw_beside(coords, half_extents, anchor=second, mover=first, before=True, image_size=image_size, rng=rng)
        placed |= {first, second}

    centres = np.round(centres)  # whole-pixel centres: a shape looks the same wherever it lands
    valid = placement_is_valid(centres, half_extents, relations, image_size)
    if not valid.any():
        return None
    return centres[int(np.argmax(valid))]


def sample_scene(cfg: ShapesConfig, num_objects: int, rng: np.random.Generator) -> Scene | None:
    """One random scene, or None when its objects could not be placed (caller redraws)."""
    # Distinct colour-shape pairs, so "the blue square" always names one object.
    num_pairs = len(cfg.colours) * len(cfg.shapes)
    pair_ids = rng.choice(num_pairs, size=min(num_objects, num_pairs), replace=False)
    size_names = list(SIZE_FRACTIONS)
    sizes = [size_names[k] for k in rng.integers(len(size_names), size=len(pair_ids))]
    half_extents = np.array([SIZE_FRACTIONS[s] * cfg.image_size for s in sizes])
    relations = relation_skeleton(len(pair_ids), rng)

    centres = place_objects(half_extents, relations, cfg.image_size, rng)
    if centres is None:
        return None
    objects = tuple(
        SceneObject(
            shape=cfg.shapes[pid % len(cfg.shapes)],
            colour=cfg.colours[pid // len(cfg.shapes)],
            size=size,
            centre=(float(cx), float(cy)),
            half_extent=float(h),
        )
        for pid, size, (cx, cy), h in zip(pair_ids, sizes, centres, half_extents)
    )
    return Scene(objects, relations)


def is_held_out(scene: Scene, pairs: set[tuple[str, str]], patterns: set[tuple[str, str, str]]) -> bool:
    """Whether the scene contains a held-out colour-shape pair or relation pattern."""
    objects = scene.objects
    if any((o.colour, o.shape) in pairs for o in objects):
        return True
    return any(
        (objects[r.subject].shape, r.relation, objects[r.reference].shape) in patterns for r in scene.relations
    )


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def describe(obj: SceneObject, definite: bool = False) -> str:
    """"a small green star", "an orange circle"; definite -> "the green star" (a second mention, no size)."""
    if definite:
        return f"the {obj.colour} {obj.shape}"
    words = [w for w in (SIZE_WORDS[obj.size], obj.colour, obj.shape) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def caption_words(scene: Scene) -> list[tuple[str, int]]:
    """The caption as (word, object) pairs: object k (1-based, its mask value) for the size, colour
    and shape words that name it, 0 for articles and relation words."""
    objects = scene.objects
    mentioned: set[int] = set()

    def mention(k: int) -> list[tuple[str, int]]:
        phrase = describe(objects[k], definite=k in mentioned).split()
        mentioned.add(k)
        return [(phrase[0], 0)] + [(word, k + 1) for word in phrase[1:]]  # the article names no object

    if not scene.relations:
        return mention(0)
    words: list[tuple[str, int]] = []
    for rel in scene.relations:
        if words:
            words.append(("and", 0))
        words += mention(rel.subject) + [(w, 0) for w in rel.relation.split()] + mention(rel.reference)
    return words


def caption(scene: Scene) -> str:
    """Lowercase, single-spaced, no punctuation; mentions every object and states every relation."""
    return " ".join(word for word, _ in caption_words(scene))


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
