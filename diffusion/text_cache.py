"""Text states for the training loop, looked up by caption row.

Frozen encoder (the default): the states of every distinct caption are computed once and reused
every step. Fine-tuned encoder (`train.text_encoder_lr > 0`): the captions are tokenised once and
their states recomputed each step, with gradients, by the text tower being trained.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


class CaptionRows:
    """Distinct captions, each with a row index; the empty prompt (the null condition) is row 0."""

    NULL_ROW = 0

    def __init__(self, captions: list[str]):
        self.distinct = list(dict.fromkeys(["", *captions]))
        self.row = {caption: i for i, caption in enumerate(self.distinct)}

    def rows(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in captions if c not in self.row]
        if missing:
            raise KeyError(f"captions not in the text cache: {missing[:3]}")
        return torch.tensor([self.row[c] for c in captions])


class TextStateCache(CaptionRows):
    """Precomputed states (N, T, D) and masks (N, T) of a frozen encoder."""

    def __init__(self, encoder, captions: list[str], batch_size: int = 512, progress: bool = True):
        super().__init__(captions)
        states, masks = [], []
        chunks = range(0, len(self.distinct), batch_size)
        for start in tqdm(chunks, desc="encoding captions", disable=not progress or len(chunks) < 4):
            s, m = encoder.encode(self.distinct[start : start + batch_size])
            states.append(s.cpu())
            masks.append(m.cpu())
        self.states = torch.cat(states)  # (N, T, D)
        self.masks = torch.cat(masks)  # (N, T) bool

    def lookup(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) row indices -> states (B, T, D) and mask (B, T) on `device`."""
        return self.states[rows].to(device), self.masks[rows].to(device)


class TunedTextStates(CaptionRows):
    """Token ids (N, T) of every caption; states come from `model` (a CLIP text tower in training) at each lookup."""

    def __init__(self, encoder, captions: list[str], model: nn.Module):
        super().__init__(captions)
        self.input_ids, self.attention_mask = (t.cpu() for t in encoder.tokenize(self.distinct))  # (N, T), (N, T)
        self.model = model  # the (possibly accelerate-wrapped) text tower whose parameters are being trained

    def lookup(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) row indices -> states (B, T, D), differentiable in the text tower's weights, and mask (B, T)."""
        input_ids, attention_mask = self.input_ids[rows].to(device), self.attention_mask[rows].to(device)
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        return states.float(), attention_mask.bool()
