"""Text hidden states of a frozen encoder, computed once per distinct caption and reused every step."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


class TextStateCache:
    """Maps captions to rows of precomputed (states (N, T, D), mask (N, T)) tensors."""

    def __init__(self, encoder, captions: list[str], batch_size: int = 512, progress: bool = True):
        distinct = list(dict.fromkeys(["", *captions]))  # the empty prompt (null condition) is row 0
        self.row = {caption: i for i, caption in enumerate(distinct)}
        states, masks = [], []
        chunks = range(0, len(distinct), batch_size)
        for start in tqdm(chunks, desc="encoding captions", disable=not progress or len(chunks) < 4):
            s, m = encoder.encode(distinct[start : start + batch_size])
            states.append(s.cpu())
            masks.append(m.cpu())
        self.states = torch.cat(states)  # (N, T, D)
        self.masks = torch.cat(masks)  # (N, T) bool

    NULL_ROW = 0

    def rows(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in captions if c not in self.row]
        if missing:
            raise KeyError(f"captions not in the text cache: {missing[:3]}")
        return torch.tensor([self.row[c] for c in captions])

    def lookup(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) row indices -> states (B, T, D) and mask (B, T) on `device`."""
        return self.states[rows].to(device), self.masks[rows].to(device)
