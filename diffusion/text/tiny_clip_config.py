"""The settings of our tiny CLIP (diffusion.text.tiny_clip), apart from it: pure Python, so that loading a
config does not load torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TinyClipConfig:
    """Architecture and training of the tiny CLIP; plain types so YAML can fill it."""

    # Tokenizer and text tower.
    vocab_size: int = 1024
    max_length: int = 32  # tokens, including <|startoftext|> and <|endoftext|>
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_mlp_width: int = 512
    # Vision tower: a small ViT.
    image_size: int = 32
    patch_size: int = 8  # a 4x4 grid of 8 px patches: ~4x cheaper per step than 4 px patches
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp_width: int = 512
    projection_dim: int = 128
    # Training.
    steps: int = 450  # ~6 epochs of 20k pairs: ~3 min on 2 CPU cores
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 30
    seed: int = 0
    retrieval_pairs: int = 100  # held-out pairs with distinct captions for the retrieval metric
