"""Evaluation prompts for the shapes domain, grouped by task, each with the clauses an image must meet.

In the manner of GenEval: every prompt is written in the dataset's caption grammar
(`diffusion.data.scenes.describe` / `caption`) and carries what it asks for (objects with colour,
shape and size word, and a relation), so a detector can check an image against it. A task names
the prompts it uses and which clauses it grades; several tasks grade the same images differently
(a single-object image is graded once for colour, once for shape and once for both).

    tasks = build_tasks(dataset_info)              # from the dataset's dataset_info.json
    for task in tasks: ...task.prompts, task.aspect
    verdict = check(prompt, detections, task.aspect)   # passed, reason, matched detections

Held-out compositions (colour-shape pairs and relation patterns that never occur in the training
captions) come from dataset_info and form their own task, "held_out"; no other task uses them.
Three-object prompts ("A rel B and C rel the B", the dataset's own skeleton) form "three_objects".
Both are reported beside the overall, not in it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import product

from diffusion.evaluation.detector import Detection
from diffusion.data.scenes import Scene, SceneObject, caption, skeleton_relations
from diffusion.data.vocabulary import parse_pair, parse_relation_pattern
from diffusion.data.relations import RELATION_AXES, RELATIONS

# A relation holds when the subject's centre lies on the stated side of the reference's centre by
# at least this many pixels along the relation's axis (left/right: x, above/below: y).
RELATION_MARGIN_PX = 1.0

# What each grading aspect checks; every aspect also checks the number of objects.
ASPECTS = {
    "all": "colour, shape, size word (when given) and relation (when given)",
    "colour": "the object's colour",
    "shape": "the object's shape",
    "shapes": "both shapes present (colours not graded)",
    "binding": "each shape in its own colour",
}


@dataclass(frozen=True)
class ExpectedObject:
    colour: str
    shape: str
    size: str | None  # "small" / "large" when the prompt says so; None: not graded
    # Positions in prompt.split() of this object's words: {"colour": i, "shape": j[, "size": k]}.
    words: dict[str, int] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)


@dataclass(frozen=True)
class ExpectedRelation:
    subject: int
    relation: str  # one of diffusion.data.shapes.RELATIONS
    reference: int


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    objects: tuple[ExpectedObject, ...]
    relations: tuple[ExpectedRelation, ...] = ()  # as the dataset states them: (0, rel, 1)[, (2, rel, 1)]
    held_out: tuple[str, ...] = ()  # which held-out compositions it contains ("pair: red triangle", ...)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Task:
    name: str
    description: str
    aspect: str  # a key of ASPECTS
    prompts: list[EvalPrompt]


@dataclass
class Verdict:
    passed: bool
    reason: str  # "" when passed
    clause: str  # the first clause that failed: "count", "object" or "relation"; "" when passed
    # matched[k]: index into the detections of expected object k, or None when not found.
    matched: list[int | None]


# ---------------------------------------------------------------------------------------------
# Building prompts
# ---------------------------------------------------------------------------------------------


def make_prompt(
    objects: list[tuple[str, str, str | None]], relations: tuple[str, ...] = (), held_out: tuple[str, ...] = ()
) -> EvalPrompt:
    """[(colour, shape, size word or None)] and the relation words -> the prompt, as the dataset words it.

    The dataset's skeleton (`skeleton_relations`): the first relation places object 0 against object 1,
    the second object 2 ("a red circle left of a blue square and a green star above the blue square").
    """
    scene_objects = tuple(SceneObject(s, c, size or "medium", (0.0, 0.0), 0.0) for c, s, size in objects)
    scene_relations = skeleton_relations(relations)
    text = caption(Scene(scene_objects, scene_relations))
    # Word positions: walk the words; each mention is article, [size], colour, shape.
    words = text.split()
    expected, position = [], 0
    for colour, shape, size in objects:
        position = words.index(colour, position)
        found = {"colour": position, "shape": position + 1}
        if size:
            found["size"] = position - 1
        if words[position + 1] != shape:
            raise ValueError(f"prompt {text!r} does not read '{colour} {shape}' at word {position}")
        expected.append(ExpectedObject(colour, shape, size, found))
        position += 2
    stated = tuple(ExpectedRelation(r.subject, r.relation, r.reference) for r in scene_relations)
    return EvalPrompt(text, tuple(expected), stated, held_out)


@dataclass(frozen=True)
class Vocabulary:
    """The dataset's colours, shapes and held-out compositions, read from its dataset_info.json."""

    colours: list[str]
    shapes: list[str]
    held_out_pairs: set[tuple[str, str]]
    held_out_relations: set[tuple[str, str, str]]

    @classmethod
    def from_info(cls, info: dict) -> Vocabulary:
        cfg = info["config"]
        colours, shapes = list(cfg["colours"]), list(cfg["shapes"])
        return cls(
            colours=colours,
            shapes=shapes,
            held_out_pairs={parse_pair(p, colours, shapes) for p in info.get("held_out_pairs", [])},
            held_out_relations={parse_relation_pattern(p, shapes) for p in info.get("held_out_relations", [])},
        )

    def held_out_in(self, objects: list[tuple[str, str, str | None]], relations: tuple[str, ...] = ()) -> tuple[str, ...]:
        found = [f"pair: {c} {s}" for c, s, _ in objects if (c, s) in self.held_out_pairs]
        for r in skeleton_relations(relations):
            pattern = (objects[r.subject][1], r.relation, objects[r.reference][1])
            if pattern in self.held_out_relations:
                found.append(f"relation: {' '.join(pattern)}")
        return tuple(found)


def single_prompts(vocab: Vocabulary) -> list[EvalPrompt]:
    """Every trained colour-shape pair: "a red circle", "a green square", ..."""
    pairs = [(c, s, None) for c in vocab.colours for s in vocab.shapes]
    return [make_prompt([p]) for p in pairs if not vocab.held_out_in([p])]


def size_prompts(vocab: Vocabulary) -> list[EvalPrompt]:
    """One per colour, sizes alternating small / large, shapes cycling: "a small red circle", ..."""
    prompts = []
    for i, colour in enumerate(vocab.colours):
        for j in range(len(vocab.shapes)):
            obj = (colour, vocab.shapes[(i + j) % len(vocab.shapes)], ("small", "large")[i % 2])
            if not vocab.held_out_in([obj]):
                prompts.append(make_prompt([obj]))
                break
    return prompts


def pair_prompts(vocab: Vocabulary, count: int) -> list[EvalPrompt]:
    """Two objects of different colours and shapes, every relation equally often, none held out.

    Deterministic: the k-th prompt takes relation k mod 4 and walks the colours and shapes with
    strides that visit every combination; held-out compositions are skipped.
    """
    colours, shapes = vocab.colours, vocab.shapes
    if len(colours) < 2 or len(shapes) < 2:
        return []
    prompts, seen, k = [], set(), 0
    while len(prompts) < count and k < 50 * count:
        c1, c2 = colours[k % len(colours)], colours[(k + 1 + k // len(colours)) % len(colours)]
        s1, s2 = shapes[(k // 2) % len(shapes)], shapes[(k // 2 + 1 + k // 7) % len(shapes)]
        relation = RELATIONS[len(prompts) % len(RELATIONS)]
        objects = [(c1, s1, None), (c2, s2, None)]
        k += 1
        if c1 == c2 or s1 == s2 or vocab.held_out_in(objects, (relation,)) or (c1, s1, c2, s2) in seen:
            continue
        seen.add((c1, s1, c2, s2))
        prompts.append(make_prompt(objects, (relation,)))
    return prompts


def three_object_prompts(vocab: Vocabulary) -> list[EvalPrompt]:
    """"A rel B and C rel the B": one prompt per pair of relation words (16 for four relations), three
    colours and three shapes all different, none held out.

    Deterministic: the k-th prompt takes three consecutive colours from colour k and three consecutive
    shapes from shape k, so every colour and shape takes every role; held-out compositions are skipped
    by shifting on.
    """
    colours, shapes = vocab.colours, vocab.shapes
    if len(colours) < 3 or len(shapes) < 3:
        return []
    prompts = []
    for k, words in enumerate(product(RELATIONS, RELATIONS)):
        for shift in range(len(colours) * len(shapes)):  # the first choice with nothing held out
            c, s = k + shift, k + shift // len(colours)
            objects = [(colours[(c + i) % len(colours)], shapes[(s + i) % len(shapes)], None) for i in range(3)]
            if not vocab.held_out_in(objects, words):
                prompts.append(make_prompt(objects, words))
                break
    return prompts


def held_out_prompts(vocab: Vocabulary) -> list[EvalPrompt]:
    """Each held-out pair alone and beside another object; each held-out relation with two colourings."""
    prompts = []
    others = [(c, s) for c in vocab.colours for s in vocab.shapes if (c, s) not in vocab.held_out_pairs]
    for i, (colour, shape) in enumerate(sorted(vocab.held_out_pairs)):
        alone = [(colour, shape, None)]
        prompts.append(make_prompt(alone, held_out=vocab.held_out_in(alone)))
        partner = next((o for o in others[i * 5 :] + others if o[0] != colour and o[1] != shape), None)
        if partner:
            relations = (RELATIONS[i % len(RELATIONS)],)
            objects = [(colour, shape, None), (*partner, None)]
            prompts.append(make_prompt(objects, relations, vocab.held_out_in(objects, relations)))
    for i, (s1, relation, s2) in enumerate(sorted(vocab.held_out_relations)):
        colourings = [
            (c1, c2) for c1 in vocab.colours for c2 in vocab.colours
            if c1 != c2 and (c1, s1) not in vocab.held_out_pairs and (c2, s2) not in vocab.held_out_pairs
        ]
        for c1, c2 in colourings[i :: max(1, len(colourings) // 2)][:2]:
            objects = [(c1, s1, None), (c2, s2, None)]
            prompts.append(make_prompt(objects, (relation,), vocab.held_out_in(objects, (relation,))))
    return prompts


def build_tasks(info: dict, quick: bool = False, num_pairs: int = 16) -> list[Task]:
    """The evaluation tasks for a shapes dataset described by its dataset_info.json.

    quick: a handful of prompts per task (two single, one size, two pairs, two held-out, one
    three-object), for tests.
    """
    vocab = Vocabulary.from_info(info)
    single, sizes = single_prompts(vocab), size_prompts(vocab)
    pairs, held_out = pair_prompts(vocab, 2 if quick else num_pairs), held_out_prompts(vocab)
    triples = three_object_prompts(vocab)
    if quick:
        single, sizes, triples = single[:: max(1, len(single) // 2)][:2], sizes[:1], triples[:1]
        held_out = held_out[:1] + [p for p in held_out[1:] if p.relations][:1]
    tasks = [
        Task("single_object", "one object of the named colour and shape", "all", single),
        Task("colour", "one object of the named colour (same images as single_object)", "colour", single),
        Task("shape", "one object of the named shape (same images as single_object)", "shape", single),
        Task("two_objects", "exactly the two named shapes (colours not graded)", "shapes", pairs),
        Task("colour_binding", "two objects, each shape in its own colour", "binding", pairs),
        Task("spatial", "two objects, each in its colour, in the named relation", "all", pairs),
        Task("size", "one object of the named size class (small / large), colour and shape", "all", sizes),
        Task("held_out", "compositions absent from the training captions (pairs and relations)", "all", held_out),
        Task("three_objects", "three objects, each in its colour, in both named relations", "all", triples),
    ]
    return [t for t in tasks if t.prompts]


# ---------------------------------------------------------------------------------------------
# Checking an image's detections against a prompt
# ---------------------------------------------------------------------------------------------


def object_matches(expected: ExpectedObject, found: Detection, aspect: str) -> bool:
    if aspect == "colour":
        return found.colour == expected.colour
    if aspect in ("shape", "shapes"):
        return found.shape == expected.shape
    size_ok = expected.size is None or aspect != "all" or found.size == expected.size
    return found.colour == expected.colour and found.shape == expected.shape and size_ok


def match_objects(prompt: EvalPrompt, detections: list[Detection], aspect: str) -> list[int | None]:
    """A one-to-one assignment of expected objects to detections that fit them, as complete as possible.

    Each expected object may take any detection that fits it (or none); every combination is tried
    (prompts hold at most 3 objects). Preferred: the most objects matched, then the most relations holding,
    then the largest matched area, then the earliest detections.
    """
    options = [
        [d for d, found in enumerate(detections) if object_matches(o, found, aspect)] + [None] for o in prompt.objects
    ]
    best, best_key = [None] * len(prompt.objects), None
    for assignment in product(*options):
        used = [d for d in assignment if d is not None]
        if len(used) != len(set(used)):
            continue
        complete = len(used) == len(assignment)
        holding = sum(relation_holds(r, assignment, detections) for r in prompt.relations) if complete else 0
        area = sum(detections[d].area for d in used)
        key = (len(used), holding, area)
        if best_key is None or key > best_key:  # ties: the first in detection order
            best, best_key = list(assignment), key
    return best


def relation_holds(relation: ExpectedRelation, assignment, detections: list[Detection]) -> bool:
    axis, subject_first = RELATION_AXES[relation.relation]
    subject = detections[assignment[relation.subject]].centre[axis]
    reference = detections[assignment[relation.reference]].centre[axis]
    gap = reference - subject if subject_first else subject - reference
    return gap >= RELATION_MARGIN_PX


def wanted(obj: ExpectedObject, aspect: str) -> str:
    """What the aspect looks for, in words: "red object", "circle", "small red circle"."""
    if aspect == "colour":
        return f"{obj.colour} object"
    if aspect in ("shape", "shapes"):
        return obj.shape
    return obj.describe() if aspect == "all" else f"{obj.colour} {obj.shape}"


def check(prompt: EvalPrompt, detections: list[Detection], aspect: str) -> Verdict:
    """Whether an image's detections meet every clause the aspect grades, and why not."""
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; choose one of {list(ASPECTS)}")
    matched = match_objects(prompt, detections, aspect)
    found = ", ".join(f"{d.size} {d.describe()}" for d in detections) or "nothing"
    if len(detections) != len(prompt.objects):
        reason = f"{len(detections)} objects, expected {len(prompt.objects)} (found: {found})"
        return Verdict(False, reason, "count", matched)
    missing = [o for o, d in zip(prompt.objects, matched) if d is None]
    if missing:
        return Verdict(False, f"no {', no '.join(wanted(o, aspect) for o in missing)} (found: {found})", "object", matched)
    broken = [r for r in prompt.relations if not relation_holds(r, matched, detections)] if aspect == "all" else []
    if broken:
        rel = broken[0]
        axis = "x" if RELATION_AXES[rel.relation][0] == 0 else "y"
        subject, reference = (detections[matched[k]] for k in (rel.subject, rel.reference))
        return Verdict(
            False,
            f"{subject.describe()} not {rel.relation} {reference.describe()} "
            f"(centre {axis} {subject.centre[RELATION_AXES[rel.relation][0]]:.1f} vs "
            f"{reference.centre[RELATION_AXES[rel.relation][0]]:.1f})",
            "relation",
            matched,
        )
    return Verdict(True, "", "", matched)
