"""A CLIP text encoder: prompts in, per-token hidden states and a padding mask out.

Works with any saved CLIP: a Hub id such as `openai/clip-vit-base-patch32`, a local `CLIPModel`
directory (only its text tower is loaded) or a local `CLIPTextModel` directory. The project's
offline default is `tiny-clip`, trained by `diffusion.text.tiny_clip`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from diffusion.errors import UserError
from diffusion.text.prompt_tokens import dropped_text


class TextEncoderLoadError(UserError, RuntimeError):
    """A CLIP text encoder could not be loaded from the Hub or from a local directory."""


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report: a CLIPModel checkpoint always has vision weights the text tower leaves unused."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_text_tower(name_or_path: str) -> CLIPTextModel:
    """The text tower of a saved CLIPModel or CLIPTextModel (`from_pretrained` picks `text_config` by itself)."""
    with quiet_transformers():
        model, loading_info = CLIPTextModel.from_pretrained(name_or_path, output_loading_info=True)
    if loading_info["missing_keys"]:  # checked here, since the report that would name them is silenced
        missing = sorted(loading_info["missing_keys"])
        raise OSError(f"the checkpoint has no weights for {len(missing)} text-tower parameters, e.g. {missing[:3]}")
    return model


def load_error_message(name_or_path: str, error: Exception) -> str:
    if Path(name_or_path).is_dir():
        return (
            f"Could not load a CLIP text encoder from the local directory '{name_or_path}' ({error}). "
            "It must hold a saved CLIPModel or CLIPTextModel (config.json + weights) and its CLIP tokenizer files "
            "(vocab.json + merges.txt, or tokenizer.json)."
        )
    return (
        f"Could not load the CLIP text encoder '{name_or_path}' from the Hugging Face Hub (offline, or not found). "
        "To fix: point `text_encoder.name` at a local directory holding a saved CLIP "
        "(tokenizer files + config.json + weights), or use the default `tiny-clip`, "
        "which the project trains offline (python -m diffusion.text.tiny_clip)."
    )


def token_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, input_embeddings: bool
) -> torch.Tensor:
    """What the UNet reads, float32: the text tower's last hidden state (B, T, D), or with
    `input_embeddings` that state beside each token's input embedding (word + position), (B, T, 2D)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=input_embeddings)
    if not input_embeddings:
        return out.last_hidden_state.float()  # (B, T, D)
    return torch.cat([out.last_hidden_state, out.hidden_states[0]], dim=-1).float()  # (B, T, 2D)


class TextEncoder(nn.Module):
    """A CLIP tokenizer + text transformer, always in eval mode (CLIP has no dropout).

    Wrapping a tower leaves its `requires_grad` as it is: a tower being fine-tuned
    (`train.text_encoder_lr`) keeps learning when the pipeline wraps it for validation. Loading
    (`from_pretrained`) is what freezes a tower."""

    def __init__(self, tokenizer: CLIPTokenizer, model: CLIPTextModel, input_embeddings: bool = False):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self.model.eval()
        self.input_embeddings = input_embeddings  # states (B, T, 2D): last hidden state | input embedding

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, input_embeddings: bool = False) -> TextEncoder:
        name_or_path = str(name_or_path)
        folder = Path(name_or_path)
        tokenizer_files = (folder / "tokenizer.json").is_file() or all(
            (folder / f).is_file() for f in ("vocab.json", "merges.txt")
        )
        if folder.is_dir() and not tokenizer_files:
            # transformers would quietly fall back to a tokenizer named in the folder's config, from elsewhere.
            raise TextEncoderLoadError(
                f"the local directory '{name_or_path}' has no CLIP tokenizer files: it needs vocab.json and "
                "merges.txt (or tokenizer.json) beside config.json. Save the tokenizer there too "
                "(tokenizer.save_pretrained(folder)), or point text_encoder.name at a folder that has it."
            )
        try:
            # The model first: offline, a missing Hub id makes the tokenizer come back empty instead of raising.
            model = load_text_tower(name_or_path)
            tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError, RuntimeError) as error:  # not found, offline, or not a CLIP checkpoint
            raise TextEncoderLoadError(load_error_message(name_or_path, error)) from error
        model.requires_grad_(False)
        return cls(tokenizer, model, input_embeddings)

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen: stays in eval mode even when a parent module is put in training mode."""
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def width(self) -> int:
        """The width of the states it gives the UNet (the UNet's context_dim)."""
        return self.hidden_size * (2 if self.input_embeddings else 1)

    @property
    def max_length(self) -> int:
        return min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def warn_if_truncated(self, prompts: list[str]) -> None:
        """Warn, naming the prompt and the words it loses, for each prompt longer than `max_length` tokens."""
        encoded = self.tokenizer(prompts, return_offsets_mapping=True, verbose=False)
        for prompt, offsets in zip(prompts, encoded["offset_mapping"]):
            if len(offsets) <= self.max_length:
                continue
            # Truncation keeps <|startoftext|> + (max_length - 2) tokens + <|endoftext|>.
            first_dropped_char = offsets[self.max_length - 1][0]
            warnings.warn(
                f"Prompt {prompt!r} is longer than {self.max_length} tokens and was truncated; "
                f"dropped words: {dropped_text(prompt, first_dropped_char)!r}",
                stacklevel=3,
            )

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) and attention mask (B, T), both long, padded/truncated to T = max_length."""
        self.warn_if_truncated(prompts)
        encoded = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states float32 (B, T, D) and mask bool (B, T) (True = real token) for tokenized prompts."""
        return token_states(self.model, input_ids, attention_mask, self.input_embeddings), attention_mask.bool()

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states float32 (B, T, D) and mask bool (B, T). The empty prompt "" is the null condition."""
        input_ids, attention_mask = self.tokenize(prompts)  # (B, T), (B, T)
        return self.encode_ids(input_ids, attention_mask)

    def token_strings(self, prompt: str) -> list[str]:
        """CLIP token strings of the kept (non-pad) tokens, e.g. ['<|startoftext|>', 'a</w>', 'red</w>', ..., '<|endoftext|>']."""
        input_ids, attention_mask = self.tokenize([prompt])  # (1, T), (1, T)
        kept_ids = input_ids[0][attention_mask[0].bool()].tolist()
        return self.tokenizer.convert_ids_to_tokens(kept_ids)
