"""The relation grammar: which relations a prompt states, read from its words."""

from diffusion.data.relations import RELATION_AXES, RELATION_PHRASES, StatedRelation, stated_relations


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
