"""DIAGNOSTIC for issue 15 (an experiment, not a feature): an oracle code for each object's side.

`ROLE_CODE=<scale>` in the environment adds, to the text state of every token of every word on one
side of a stated relation ("<subject> left of <reference>"), a fixed direction for that side: before
or after along x, before or after along y (4 sides). The subject of "left of" gets "before along x",
its reference "after along x"; the converse caption swaps them. So the keys and values of the object
words say where their object goes, read from the caption's grammar (diffusion.text.relations), as a
perfect bidirectional text encoder could. If the UNet learns relations from this in the default's 30
minutes, the text states are what limits it; if not, the UNet (or the loss) is.

Applied in TextEncoder.encode (sampling, probes, frozen caches) and TunedTextStates (training), so
training and sampling see the same codes when the variable is set for both.
"""

from __future__ import annotations

import os

import torch

from diffusion.text.prompt_tokens import prompt_tokens
from diffusion.text.relations import stated_relations

NUM_SIDES = 4  # (x, before), (x, after), (y, before), (y, after)


def role_scale() -> float:
    return float(os.environ.get("ROLE_CODE", "0"))


def side_bits(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """(B, T, 4) counts: how often each token's word lies on each side of a stated relation."""
    bits = torch.zeros(len(prompts), max_length, NUM_SIDES)
    for b, prompt in enumerate(prompts):
        tokens = prompt_tokens(tokenizer, prompt, max_length)
        for relation in stated_relations(tokens.words):
            sides = ((relation.subject, relation.subject_first), (relation.reference, not relation.subject_first))
            for words, before in sides:
                side = 2 * relation.axis + (0 if before else 1)
                for w in words:
                    bits[b, tokens.token_indices(w), side] += 1
    return bits


def side_codes(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, T, 4) side counts -> (B, T, D) codes: fixed random directions of norm sqrt(D), times the scale."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(NUM_SIDES, dim, generator=generator)  # (4, D)
    directions = directions / directions.norm(dim=1, keepdim=True) * dim**0.5
    return bits.float() @ directions.to(bits.device) * role_scale()  # (B, T, D)
