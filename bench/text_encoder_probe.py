"""What a CLIP text tower keeps apart: token states of similar words, and word-swap discrimination.

1. Cosine similarity, at every layer, of the hidden state of one word against another in the same
   context ("a small green triangle" vs "a small green star", at the last token). Near 1 means the
   diffusion model gets almost the same condition for both words.
2. On test images, how often the true caption scores above a copy with one word changed: a shape
   word replaced, a colour word replaced, or the relation reversed (left <-> right, above <-> below).
   0.5 is chance: the tower ignores that word.

    python bench/text_encoder_probe.py --clip outputs/cache/text_encoders/tiny-clip-<hash> \
        --data outputs/cache/datasets/shapes-<hash> [--images 400]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from diffusion.tiny_clip import load_pairs, projected

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
WORD_PAIRS = [("triangle", "star"), ("square", "circle"), ("circle", "star"), ("red", "blue"), ("green", "yellow")]
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@torch.no_grad()
def layer_similarities(model: CLIPModel, tokenizer: CLIPTokenizer, a: str, b: str) -> list[float]:
    """Cosine of the last word's state, "a small green <a>" vs "... <b>" (colours: "a small <a> star"), per layer."""
    template = "a small {} star" if a in COLOURS else "a small green {}"
    encoded = tokenizer([template.format(a), template.format(b)], return_tensors="pt", padding=True)
    position = 3 if a in COLOURS else 4  # <start> a small green <shape>
    hidden = model.text_model(**encoded, output_hidden_states=True).hidden_states  # embeddings + each layer
    return [F.cosine_similarity(h[0, position], h[1, position], dim=0).item() for h in hidden]


def changed(caption: str, kind: str, rng: random.Random) -> str | None:
    words = caption.split()
    if kind == "relation":
        slots = [i for i, w in enumerate(words) if w in OPPOSITE]
        if not slots:
            return None
        i = rng.choice(slots)
        return " ".join(words[:i] + [OPPOSITE[words[i]]] + words[i + 1 :])
    vocabulary = SHAPES if kind == "shape" else COLOURS
    slots = [i for i, w in enumerate(words) if w in vocabulary]
    i = rng.choice(slots)
    return " ".join(words[:i] + [rng.choice([v for v in vocabulary if v != words[i]])] + words[i + 1 :])


@torch.no_grad()
def swap_discrimination(model, tokenizer, pairs, count: int, kind: str) -> tuple[float, int]:
    rng = random.Random(0)
    indices = list(range(min(count, len(pairs.captions))))
    images = F.normalize(projected(model.get_image_features(pixel_values=pairs.pixel_values(indices))), dim=-1)
    wins = total = 0
    for i in indices:
        caption = pairs.captions[i]
        other = changed(caption, kind, rng)
        if other is None:
            continue
        encoded = tokenizer([caption, other], return_tensors="pt", padding=True)
        texts = F.normalize(projected(model.get_text_features(**encoded)), dim=-1)  # (2, P)
        scores = texts @ images[i]
        wins += int(scores[0] > scores[1])
        total += 1
    return wins / max(1, total), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True, help="a saved CLIPModel folder (with its tokenizer)")
    parser.add_argument("--data", required=True, help="the shapes dataset root (its test/ split is used)")
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    model = CLIPModel.from_pretrained(args.clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(args.clip)
    print("cosine of word states, per layer (embeddings, layer 1, ...):")
    for a, b in WORD_PAIRS:
        print(f"  {a:>8s} / {b:<8s} " + " ".join(f"{c:.3f}" for c in layer_similarities(model, tokenizer, a, b)))
    pairs = load_pairs(Path(args.data) / "test", model.config.vision_config.image_size)
    for kind in ("shape", "colour", "relation"):
        score, total = swap_discrimination(model, tokenizer, pairs, args.images, kind)
        print(f"{kind} changed: true caption preferred {score:.3f} of {total}")


if __name__ == "__main__":
    main()
