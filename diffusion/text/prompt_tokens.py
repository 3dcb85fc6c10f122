"""Which token of a prompt belongs to which word: the key that turns token maps into word maps."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from transformers import PreTrainedTokenizerBase


@dataclass
class PromptTokens:
    """The kept tokens of one prompt, in order, and how they group into words.

    tokens[0] is the start token and tokens[-1] the end token; padding follows them (`num_padding`
    positions, never attended to). word_of_token[i] is the index into `words` of token i, or None
    for the start and end tokens. `words` keeps repeated words apart: one entry per position.
    """

    prompt: str
    tokens: list[str]
    word_of_token: list[int | None]
    words: list[str]
    start_token: int
    end_token: int
    num_padding: int
    dropped_words: str  # what truncation cut off ("" when nothing was)

    def token_indices(self, word_index: int) -> list[int]:
        return [i for i, w in enumerate(self.word_of_token) if w == word_index]

    def to_dict(self) -> dict:
        return asdict(self)


def dropped_text(prompt: str, first_dropped_char: int) -> str:
    """The end of `prompt` cut off by truncation, widened back to the start of the word the cut falls in."""
    start = first_dropped_char
    while start > 0 and not prompt[start - 1].isspace():
        start -= 1
    return prompt[start:].strip()


def word_spans(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of `prompt`."""
    return [m.span() for m in re.finditer(r"\S+", prompt)]


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int) -> PromptTokens:
    """Tokenize like the text encoder does (truncated to max_length) and map tokens to words."""
    # verbose=False: a too-long prompt is reported once, by TextEncoder.warn_if_truncated, not by transformers too.
    full = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True, verbose=False)
    ids, offsets = full["input_ids"], full["offset_mapping"]
    dropped = ""
    if len(ids) > max_length:  # keep <start> + (max_length - 2) tokens + <end>, as truncation does
        first_dropped = offsets[max_length - 1][0]
        dropped = dropped_text(prompt, first_dropped)
        ids = ids[: max_length - 1] + ids[-1:]
        offsets = offsets[: max_length - 1] + offsets[-1:]
    spans = word_spans(prompt)
    used_words: list[int] = []
    word_of_token: list[int | None] = []
    for i, (start, end) in enumerate(offsets):
        if i == 0 or i == len(offsets) - 1 or start == end:
            word_of_token.append(None)  # start / end token
            continue
        index = next(w for w, (ws, we) in enumerate(spans) if ws <= start < we)
        word_of_token.append(index)
        if index not in used_words:
            used_words.append(index)
    # Renumber to the kept words only (truncation may have cut the last ones).
    renumber = {old: new for new, old in enumerate(used_words)}
    words = [prompt[spans[w][0] : spans[w][1]] for w in used_words]
    return PromptTokens(
        prompt=prompt,
        tokens=tokenizer.convert_ids_to_tokens(ids),
        word_of_token=[None if w is None else renumber[w] for w in word_of_token],
        words=words,
        start_token=0,
        end_token=len(ids) - 1,
        num_padding=max_length - len(ids),
        dropped_words=dropped,
    )
