"""Prompt-to-prompt editing (Hertz et al. 2022) on our own attention: change words, keep the layout.

A source prompt and its edit are sampled side by side, from the same seed: the same initial noise,
the same per-step noise (each image draws from its own generator), the same text-placer layout. For
the first steps the edit's cross-attention probabilities are replaced by the source's, so each word
acts where the source's word acted; its values still come from the edited prompt, so what is drawn
there follows the new words. Three edits, one mechanism:

* Replace, a word swapped (`a red circle ...` -> `a red star ...`): the new word takes the old word's map;
* Refine, words added or removed (`a red circle` -> `a small red circle`): the words both prompts share
  are aligned and take the source's maps, the new ones attend freely;
* Re-weight: a word's attention in the edit scaled by a factor (`red=2`), alone or with an edit.

The words are aligned by difflib's longest matching blocks; a run of swapped words the same length in
both prompts is a Replace, word by word. Per edited token j, over source tokens s:

    M[j, s]       = 1 / (tokens of j's source word) for the tokens s of the word j is aligned with (B, T, T)
    injected      = source probs @ M^T                      (B, heads, HW, T)
    edit probs    = a_j * injected + (1 - a_j) * edit probs   a_j = 1 while step < cross_replace(word of j) * N
    edit probs   *= weight_j                                 the re-weight (1 for most words), at every step
    self probs    = source self probs                        while step < self_replace * N

Only the prompts' conditional rows are controlled (the unconditional rows read the same empty prompt).
The text placer follows the source too: each aligned token of the edit takes its source token's
proposed centres (`follow_centres`), so the keys the edit's maps are read with agree with its layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from difflib import SequenceMatcher

import torch

from diffusion.model.attention import AttentionRecorder
from diffusion.sampling.loop import SamplingHook
from diffusion.sampling.settings import EditSettings, EditSettingsError
from diffusion.text.prompt_tokens import PromptTokens


@dataclass
class Alignment:
    """How an edited prompt's tokens take their maps from its source's (both padded to T tokens)."""

    matrix: torch.Tensor  # (T, T): row j weights the source tokens edited token j takes its map from
    aligned: torch.Tensor  # (T,) bool: the edited tokens that take a map from the source
    source_word: dict[int, int]  # edited word index -> the source word it is aligned with
    described: list[str]  # one line per edited word: 'red <- red', 'star <- circle', 'small (new)'


def align(source: PromptTokens, edited: PromptTokens, max_length: int) -> Alignment:
    """Align the edited prompt's words with the source's (see the module's docstring)."""
    pairs: dict[int, int] = {}
    matcher = SequenceMatcher(None, [w.lower() for w in source.words], [w.lower() for w in edited.words], autojunk=False)
    for op, s0, s1, e0, e1 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and s1 - s0 == e1 - e0):  # shared words, or a swap word by word
            pairs.update(zip(range(e0, e1), range(s0, s1)))
    matrix = torch.zeros(max_length, max_length)
    for e, s in pairs.items():
        sources = source.token_indices(s)
        for j in edited.token_indices(e):
            matrix[j, sources] = 1.0 / len(sources)
    matrix[edited.start_token, source.start_token] = 1.0
    matrix[edited.end_token, source.end_token] = 1.0
    described = [
        f"{word} <- {source.words[pairs[w]]}" if w in pairs else f"{word} (new)" for w, word in enumerate(edited.words)
    ]
    return Alignment(matrix, matrix.sum(dim=1) > 0, pairs, described)


def word_tokens(tokens: PromptTokens, word: str, given: str) -> list[int]:
    """The token indices of every occurrence of `word` in the prompt; a clear message naming the flag as
    `given` if it has none."""
    indices = [i for w, text in enumerate(tokens.words) if text.lower() == word.lower() for i in tokens.token_indices(w)]
    if not indices:
        raise EditSettingsError(
            f"{given}: the prompt {tokens.prompt!r} has no word {word!r}; its words are: {', '.join(tokens.words)}"
        )
    return indices


class PromptToPrompt(SamplingHook):
    """The sampling hook of n edits sampled beside their n sources: rows [0, n) are the sources,
    rows [n, 2n) their edits (and, with guidance, the unconditional rows after them)."""

    def __init__(self, sources: list[PromptTokens], edits: list[PromptTokens], settings: EditSettings, num_steps: int, max_length: int):
        self.n = len(sources)
        self.alignments = [align(s, e, max_length) for s, e in zip(sources, edits)]
        self.matrix = torch.stack([a.matrix for a in self.alignments])  # (n, T, T)
        # Per edited token, the number of first steps it takes the source's map (0 for a new word).
        until = torch.zeros(self.n, max_length, dtype=torch.long)
        self.weights = torch.ones(self.n, max_length)  # (n, T)
        for b, (alignment, tokens) in enumerate(zip(self.alignments, edits)):
            until[b] = alignment.aligned.long() * math.ceil(settings.cross_replace * num_steps)
            for word, fraction in settings.cross_replace_words:
                indices = word_tokens(tokens, word, f"--cross-replace {word}={fraction:g}")
                if not alignment.aligned[indices].all():
                    raise EditSettingsError(
                        f"--cross-replace {word}={fraction:g}: {word!r} is new in {tokens.prompt!r} (no word of the source "
                        f"{sources[b].prompt!r} is aligned with it), so it has no source map to take; drop it"
                    )
                until[b, indices] = math.ceil(fraction * num_steps)
            for word, weight in settings.reweight:
                self.weights[b, word_tokens(tokens, word, f"--reweight {word}={weight:g}")] = weight
        self.until = until
        self.cross_steps = int(until.max())  # no step from this one on injects a map
        self.reweighted = bool((self.weights != 1).any())
        self.self_steps = math.ceil(settings.self_replace * num_steps)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(matrix, until, weights) on `device`, moved once."""
        if device not in self._on_device:
            self._on_device[device] = (self.matrix.to(device), self.until.to(device), self.weights.to(device))
        return self._on_device[device]

    def recorder(self, i: int, t: int) -> AttentionRecorder | None:
        """At step i: the edits' cross-attention made the source's where it is still injected, then re-weighted."""
        if i >= self.cross_steps and not self.reweighted:
            return None  # nothing to change at this step: the fused path
        n = self.n

        def control(layer_name: str, probs: torch.Tensor) -> torch.Tensor:
            matrix, until, weights = self._tensors(probs.device)
            t_len = probs.shape[-1]
            source, edit = probs[:n], probs[n : 2 * n]  # (n, heads, HW, T) each
            injected = torch.einsum("bhqs,bts->bhqt", source, matrix[:, :t_len, :t_len])  # (n, heads, HW, T)
            alpha = (until[:, None, None, :t_len] > i).to(probs.dtype)  # (n, 1, 1, T)
            edited = (alpha * injected + (1 - alpha) * edit) * weights[:, None, None, :t_len]  # (n, heads, HW, T)
            return torch.cat([source, edited, probs[2 * n :]])  # (R, heads, HW, T)

        return control

    def self_recorder(self, i: int, t: int) -> AttentionRecorder | None:
        """At the first `self_replace` steps: the edits' self-attention made the source's."""
        if i >= self.self_steps:
            return None
        n = self.n

        def control(layer_name: str, probs: torch.Tensor) -> torch.Tensor:
            return torch.cat([probs[:n], probs[:n], probs[2 * n :]])  # (R, heads, HW, HW)

        return control

    def follow_centres(self, centres: torch.Tensor) -> torch.Tensor:
        """The text placer's proposals (2n, T, K, 2) with each edit's aligned tokens given their source tokens'."""
        matrix, _, _ = self._tensors(centres.device)
        n, t_len = self.n, centres.shape[1]
        source, edit = centres[:n], centres[n:]
        taken = torch.einsum("bts,bskc->btkc", matrix[:, :t_len, :t_len].to(centres.dtype), source)  # (n, T, K, 2)
        aligned = (matrix[:, :t_len, :t_len].sum(-1) > 0)[:, :, None, None]  # (n, T, 1, 1)
        return torch.cat([source, torch.where(aligned, taken, edit)])
