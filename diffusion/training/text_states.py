"""Text states for the training loop, looked up by caption row, and the two ways to train with them.

`TunedText` (the default, `train.text_encoder_lr > 0`): the captions are tokenised once and their
states recomputed each step, with gradients, by the text tower being trained (with its own EMA).
`FrozenText` (`train.text_encoder_lr: 0`): the states of every distinct caption are computed once
and reused every step. The loop sees one interface: `states`, and what each adds to the optimizer,
to accelerate's preparation, to the checkpoint and to the EMA weights.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from diffusion.text.encoder import token_states


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
    """Precomputed states (N, T, D) and masks (N, T) of a frozen encoder, on the encoder's device."""

    def __init__(self, encoder, captions: list[str], batch_size: int = 512, progress: bool = True):
        super().__init__(captions)
        states, masks = [], []
        chunks = range(0, len(self.distinct), batch_size)
        for start in tqdm(chunks, desc="encoding captions", disable=not progress or len(chunks) < 4):
            s, m = encoder.encode(self.distinct[start : start + batch_size])
            states.append(s)
            masks.append(m)
        self.states = torch.cat(states)  # (N, T, D)
        self.masks = torch.cat(masks)  # (N, T) bool

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) row indices, on the cache's device -> states (B, T, D) and mask (B, T)."""
        return self.states[rows], self.masks[rows]


class TunedTextStates(CaptionRows):
    """Token ids (N, T) of every caption, on the encoder's device; states come from `model` (a CLIP text tower
    in training) at each lookup."""

    def __init__(self, encoder, captions: list[str], model: nn.Module):
        super().__init__(captions)
        self.input_ids, self.attention_mask = encoder.tokenize(self.distinct)  # (N, T), (N, T)
        self.model = model  # the (possibly accelerate-wrapped) text tower whose parameters are being trained
        self.input_embeddings = encoder.input_embeddings

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) row indices, on the ids' device -> states (B, T, D), differentiable in the text tower's weights, and mask (B, T)."""
        input_ids, attention_mask = self.input_ids[rows], self.attention_mask[rows]
        states = token_states(self.model, input_ids, attention_mask, self.input_embeddings)  # (B, T, D or 2D)
        return states, attention_mask.bool()


class FrozenText:
    """The text tower as loaded; every caption's states computed once."""

    tuned = False

    def __init__(self, encoder, captions: list[str], progress: bool):
        self.encoder = encoder
        self.states = TextStateCache(encoder, captions, progress=progress)
        self.trained: tuple[nn.Module, ...] = ()  # modules the optimizer updates
        self.checkpointed: list[EMAModel] = []  # state accelerate saves with each checkpoint
        self.averages: list[tuple[EMAModel, nn.Module]] = []  # (EMA, module) pairs swapped in for sampling

    def parameter_groups(self) -> list[dict]:
        return []

    def to_prepare(self) -> tuple[nn.Module, ...]:
        return ()

    def prepared(self, modules: tuple[nn.Module, ...], accelerator: Accelerator) -> None:
        pass

    def ema_step(self) -> None:
        pass

    def describe(self) -> str:
        return "text encoder frozen (train.text_encoder_lr: 0); caption states computed once"


class TunedText(FrozenText):
    """The text tower fine-tuned with the UNet on the same losses, at its own learning rate, with an EMA."""

    tuned = True

    def __init__(self, encoder, captions: list[str], lr: float, ema_decay: float):
        self.encoder, self.captions, self.lr = encoder, captions, lr
        encoder.model.requires_grad_(True)
        self.ema = EMAModel(encoder.model.parameters(), decay=ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True)
        self.states: TunedTextStates | None = None  # once accelerate has prepared the tower
        self.trained, self.checkpointed, self.averages = (), [self.ema], [(self.ema, encoder.model)]

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.encoder.model.parameters()), "lr": self.lr}]

    def to_prepare(self) -> tuple[nn.Module, ...]:
        return (self.encoder.model,)

    def prepared(self, modules: tuple[nn.Module, ...], accelerator: Accelerator) -> None:
        (text_model,) = modules
        self.states = TunedTextStates(self.encoder, self.captions, text_model)
        self.trained = (text_model,)

    def ema_step(self) -> None:
        self.ema.step(self.encoder.model.parameters())

    def describe(self) -> str:
        params = sum(p.numel() for p in self.encoder.model.parameters())
        return f"fine-tuning the text encoder ({params / 1e6:.2f}M parameters) at lr {self.lr:g}"
