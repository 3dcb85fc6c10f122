"""The shapes world's words: palette colours, shape names, sizes, the held-out compositions'
notation, and `ShapesConfig`, the settings that choose a dataset from them. Pure Python, so the
config can check a dataset's settings without loading numpy or PIL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusion.data.relations import CONVERSE, RELATIONS

# Palette: well-separated saturated colours, all far from the white background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 210, 0),
    "purple": (140, 40, 190),
    "orange": (255, 130, 0),
    "cyan": (0, 190, 210),
    "pink": (255, 105, 180),
    "brown": (130, 80, 30),
    "black": (0, 0, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Half-extent of an object's nominal box, as a fraction of image_size (at 32 px: 4.5 / 6.1 / 8 px).
# Chosen so that three small objects fit in a row at 32 px, and a large one beside a medium one.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.14, "medium": 0.19, "large": 0.25}
# Only these size words appear in captions; "medium" is the unmarked default.
SIZE_WORDS: dict[str, str] = {"small": "small", "medium": "", "large": "large"}

MAX_SUPPORTED_OBJECTS = 3  # the caption grammar below covers 1, 2 or 3 objects


def parse_pair(text: str, colours: list[str], shapes: list[str]) -> tuple[str, str]:
    """"red triangle" -> ("red", "triangle")."""
    words = text.split()
    if len(words) != 2 or words[0] not in colours or words[1] not in shapes:
        raise ValueError(
            f"held-out pair {text!r} must read '<colour> <shape>' with colour in {colours} and shape in {shapes}"
        )
    return words[0], words[1]


def parse_relation_pattern(text: str, shapes: list[str]) -> tuple[str, str, str]:
    """"circle above square" -> ("circle", "above", "square"); "star left of circle" works too."""
    words = text.split()
    if len(words) >= 3 and words[0] in shapes and words[-1] in shapes:
        relation = " ".join(words[1:-1])
        if relation in RELATIONS:
            return words[0], relation, words[-1]
    raise ValueError(
        f"held-out relation {text!r} must read '<shape> <relation> <shape>' "
        f"with shapes in {shapes} and relation in {list(RELATIONS)}"
    )


def with_converses(patterns: list[str], shapes: list[str]) -> list[str]:
    """Held-out relation patterns and, after them, their converse phrasings: holding out "circle above
    square" holds out the composition, so "square below circle" goes too (else it trains under the other words)."""
    converses = []
    for pattern in patterns:
        subject, relation, reference = parse_relation_pattern(pattern, shapes)
        converses.append(f"{reference} {CONVERSE[relation]} {subject}")
    return list(dict.fromkeys([*patterns, *converses]))


@dataclass
class ShapesConfig:
    """Everything that defines a generated shapes dataset; plain types so YAML can fill it."""

    num_train: int = 20000
    num_test: int = 1000
    image_size: int = 32
    seed: int = 0
    colours: list[str] = field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"]
    )
    shapes: list[str] = field(default_factory=lambda: list(SHAPE_NAMES))
    max_objects: int = 3
    held_out_pairs: list[str] = field(default_factory=lambda: ["red triangle", "blue star"])
    # A relation pattern is held out in both phrasings (no training caption says "square below circle" either).
    held_out_relations: list[str] = field(default_factory=lambda: ["circle above square"])

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the allowed values."""
        unknown_colours = [c for c in self.colours if c not in PALETTE]
        if unknown_colours or not self.colours:
            raise ValueError(f"shapes.colours {self.colours} must be a non-empty subset of {list(PALETTE)}")
        unknown_shapes = [s for s in self.shapes if s not in SHAPE_NAMES]
        if unknown_shapes or not self.shapes:
            raise ValueError(f"shapes.shapes {self.shapes} must be a non-empty subset of {list(SHAPE_NAMES)}")
        if not 1 <= self.max_objects <= MAX_SUPPORTED_OBJECTS:
            raise ValueError(f"shapes.max_objects must be 1..{MAX_SUPPORTED_OBJECTS}, got {self.max_objects}")
        if self.image_size < 16:
            raise ValueError(f"shapes.image_size must be >= 16 so shapes stay recognisable, got {self.image_size}")
        if self.num_train < 0 or self.num_test < 0:
            raise ValueError("shapes.num_train and shapes.num_test must be >= 0")
        for pair in self.held_out_pairs:
            parse_pair(pair, self.colours, self.shapes)
        for pattern in self.held_out_relations:
            parse_relation_pattern(pattern, self.shapes)
        if len(self.held_out_pairs) >= len(self.colours) * len(self.shapes):
            raise ValueError("shapes.held_out_pairs holds out every colour-shape pair; nothing is left to train on")
