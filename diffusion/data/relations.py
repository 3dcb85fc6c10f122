"""The relation grammar: the four relation phrases, what each means on the image, and how a prompt
states them ("<phrase> left of / right of / above / below <phrase>", clauses joined by "and").

One module, read by the shapes captions (diffusion.data.shapes), the sampler's layout guidance
(diffusion.sampling.layout_guidance) and the evaluation's grading (diffusion.evaluation.prompts).
Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# relation -> (axis, subject first): axis 0 is x (left to right), 1 is y (top to bottom).
RELATION_AXES: dict[str, tuple[int, bool]] = {
    "left of": (0, True),
    "right of": (0, False),
    "above": (1, True),
    "below": (1, False),
}

# Each relation's converse: "A left of B" and "B right of A" state the same scene.
CONVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# The relation words as word tuples ("left", "of"), with the meaning of each:
# (axis, subject first), axis 0 is x (left to right), 1 is y (top to bottom).
RELATION_PHRASES: dict[tuple[str, ...], tuple[int, bool]] = {tuple(r.split()): m for r, m in RELATION_AXES.items()}
# Words that name nothing by themselves: left out of a relation's two sides.
FILLER_WORDS = frozenset({"a", "an", "the", "to", "on", "is", "are"})


@dataclass(frozen=True)
class StatedRelation:
    """`subject` lies before `reference` along `axis` (x or y) if `subject_first`, else after it.
    subject, reference: indices into the prompt's words."""

    subject: tuple[int, ...]
    reference: tuple[int, ...]
    axis: int
    subject_first: bool


def _match_phrase(words: list[str], i: int) -> tuple[tuple[str, ...], tuple[int, bool]] | None:
    for phrase, meaning in RELATION_PHRASES.items():
        if tuple(words[i : i + len(phrase)]) == phrase:
            return phrase, meaning
    return None


def stated_relations(words: list[str]) -> list[StatedRelation]:
    """The relations of "<phrase> <relation> <phrase> [and <phrase> <relation> <phrase> ...]".

    A side is the run of words between the relation and the nearest "and", other relation or end of
    the prompt, less filler words; a clause whose side is empty states nothing.
    """
    plain = [w.strip(".,;:!?").lower() for w in words]
    relations = []
    for i in range(len(plain)):
        match = _match_phrase(plain, i)
        if match is None:
            continue
        phrase, (axis, subject_first) = match
        start = i
        while start > 0 and plain[start - 1] != "and" and _match_phrase(plain, start - 1) is None:
            start -= 1
        end = i + len(phrase)
        stop = end
        while stop < len(plain) and plain[stop] != "and" and _match_phrase(plain, stop) is None:
            stop += 1
        subject = tuple(k for k in range(start, i) if plain[k] not in FILLER_WORDS)
        reference = tuple(k for k in range(end, stop) if plain[k] not in FILLER_WORDS)
        if subject and reference:
            relations.append(StatedRelation(subject, reference, axis, subject_first))
    return relations
