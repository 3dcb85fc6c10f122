"""A shapes scene and its caption: which objects, where, and the sentence that states exactly that.

A scene holds 1..3 non-overlapping objects and the relations its caption states ("A rel B", or "A rel
B and C rel B"); placement draws positions until every stated relation holds by a clear margin and
no two objects touch. The caption grammar names each object by size, colour and shape, the first
mention indefinite ("a small red circle") and a repeated one definite ("the red circle").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffusion.data.relations import RELATION_AXES, RELATIONS
from diffusion.data.vocabulary import SIZE_FRACTIONS, SIZE_WORDS, ShapesConfig

SEPARATION_PX = 2.0  # minimum gap between nominal boxes: leaves >= 1 empty pixel between masks
PLACEMENT_TRIES = 16  # candidate placements drawn at once for one scene
MAX_SCENE_DRAWS = 1000  # give up (config error) if no valid scene turns up in this many draws


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
