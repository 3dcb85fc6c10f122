"""The relation grammar: which relations a prompt states, read from its words."""

from diffusion.text.relations import RELATION_AXES, RELATION_PHRASES, StatedRelation, reversed_twins, stated_relations


def words(prompt):
    return prompt.split()


def test_relations_are_read_from_the_prompt_words():
    assert stated_relations(words("a red circle left of a blue square")) == [StatedRelation((1, 2), (6, 7), 0, True)]
    assert stated_relations(words("a small star below a large square")) == [StatedRelation((1, 2), (5, 6), 1, False)]
    # Two clauses joined by "and", the second naming its reference again with "the".
    three = "a blue circle above a purple star and a red star right of the purple star"
    assert stated_relations(words(three)) == [
        StatedRelation((1, 2), (5, 6), 1, True), StatedRelation((9, 10), (14, 15), 0, False),
    ]
    assert stated_relations(words("a cat to the left of a dog.")) == [StatedRelation((1,), (7,), 0, True)]
    for nothing in ("a red circle", "left of a dog", "a red circle left of", ""):
        assert stated_relations(words(nothing)) == []


def test_every_relation_has_one_phrase_and_one_meaning():
    assert {" ".join(p) for p in RELATION_PHRASES} == set(RELATION_AXES)
    # Opposite phrases share an axis and differ in which side comes first.
    assert RELATION_AXES["left of"] == (0, True) and RELATION_AXES["right of"] == (0, False)
    assert RELATION_AXES["above"] == (1, True) and RELATION_AXES["below"] == (1, False)


def test_a_reversed_twin_states_the_opposite_of_each_relation_in_turn():
    three = "a blue circle above a purple star and a red star right of the purple star"
    twins = reversed_twins(three)
    assert twins == [
        "a blue circle below a purple star and a red star right of the purple star",
        "a blue circle above a purple star and a red star left of the purple star",
    ]
    for twin, changed in zip(twins, range(2)):
        original, flipped = stated_relations(words(three)), stated_relations(words(twin))
        # Same objects on the same axis, the other side: a false caption of the same image.
        assert [(r.subject, r.reference, r.axis) for r in flipped] == [(r.subject, r.reference, r.axis) for r in original]
        assert [r.subject_first for r in flipped] == [r.subject_first != (i == changed) for i, r in enumerate(original)]
    assert reversed_twins("a red circle") == []
