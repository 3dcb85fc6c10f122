"""What a CLIP text tower keeps apart: token states of similar words, and word-swap discrimination.

1. Cosine similarity, at every layer, of the hidden state of one word against another in the same
   context ("a small green triangle" vs "a small green star", at the last token). Near 1 means the
   diffusion model gets almost the same condition for both words. The same for a relation and its
   opposite ("a red circle left of a blue square" vs "... right of ..."), at the relation word, at
   the last word and at the end token.
2. On test images, how often the true caption scores above a copy with one word changed: a shape
   word replaced, a colour word replaced, or the relation reversed (left <-> right, above <-> below).
   0.5 is chance: the tower ignores that word. (Needs the image tower: --clip only.)
3. Whether the relation of a two-object caption can be read from one token state: held-out accuracy
   of a linear classifier (left of / right of / above / below; 0.25 is chance) on the end token's
   state and on the last word's.

    python bench/text_encoder_probe.py --clip outputs/cache/text_encoders/tiny-clip-<hash> \
        --data outputs/cache/datasets/shapes-<hash> [--images 400]
    python bench/text_encoder_probe.py --text-encoder outputs/runs/<run>/model/text_encoder \
        --data outputs/cache/datasets/shapes-<hash>       # a tuned text tower: parts 1 and 3
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from diffusion.text.prompt_tokens import prompt_tokens
from diffusion.text.tiny_clip import load_pairs, projected

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
WORD_PAIRS = [("triangle", "star"), ("square", "circle"), ("circle", "star"), ("red", "blue"), ("green", "yellow")]
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATIONS = ["left of", "right of", "above", "below"]


@torch.no_grad()
def layer_similarities(text_model, tokenizer: CLIPTokenizer, a: str, b: str) -> list[float]:
    """Cosine of the last word's state, "a small green <a>" vs "... <b>" (colours: "a small <a> star"), per layer."""
    template = "a small {} star" if a in COLOURS else "a small green {}"
    encoded = tokenizer([template.format(a), template.format(b)], return_tensors="pt", padding=True)
    position = 3 if a in COLOURS else 4  # <start> a small green <shape>
    hidden = text_model(**encoded, output_hidden_states=True).hidden_states  # embeddings + each layer
    return [F.cosine_similarity(h[0, position], h[1, position], dim=0).item() for h in hidden]


RELATION_TEMPLATE = "a red circle {} a blue square"
RELATION_PAIRS = [("left of", "right of"), ("above", "below"), ("left of", "above")]


@torch.no_grad()
def relation_similarities(text_model, tokenizer: CLIPTokenizer, a: str, b: str) -> dict[str, list[float]]:
    """Cosine per layer of the states of RELATION_TEMPLATE with relation a vs b, at three tokens."""
    encoded = tokenizer([RELATION_TEMPLATE.format(a), RELATION_TEMPLATE.format(b)], return_tensors="pt", padding=True)
    hidden = text_model(**encoded, output_hidden_states=True).hidden_states  # embeddings + each layer
    end = (encoded["attention_mask"].sum(dim=1) - 1).tolist()  # both end tokens
    relation = prompt_tokens(tokenizer, RELATION_TEMPLATE.format(a), tokenizer.model_max_length).token_indices(3)[0]  # "a red circle <rel>"
    positions = {"relation word": (relation, relation), "last word": (end[0] - 1, end[1] - 1), "end token": tuple(end)}
    return {name: [F.cosine_similarity(h[0, i], h[1, j], dim=0).item() for h in hidden] for name, (i, j) in positions.items()}


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


@torch.no_grad()
def relation_states(text_model, tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """(N, D) states of each caption's end token and of its last word."""
    encoded = tokenizer(captions, return_tensors="pt", padding=True)
    states = text_model(**encoded).last_hidden_state  # (N, T, D)
    end = encoded["attention_mask"].sum(dim=1) - 1  # (N,)
    rows = torch.arange(len(captions))
    return {"end token": states[rows, end], "last word": states[rows, end - 1]}


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Train a softmax classifier on the first 80% of rows, report its accuracy on the rest."""
    features = (features - features.mean(0)) / features.std(0).clamp(min=1e-6)
    split = int(0.8 * len(labels))
    weight = torch.zeros(features.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(features[:split] @ weight + bias, labels[:split])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((features[split:] @ weight + bias).argmax(1) == labels[split:]).float().mean().item()


def relation_probe(text_model, tokenizer, data_root: Path, count: int = 3000) -> dict[str, float]:
    """Held-out linear-probe accuracy of the relation of two-object training captions, per token read."""
    rows = [json.loads(line) for line in (data_root / "train" / "metadata.jsonl").read_text().splitlines()]
    rows = [r for r in rows if len(r["objects"]) == 2][:count]
    labels = torch.tensor([RELATIONS.index(r["relations"][0]["relation"]) for r in rows])
    states = relation_states(text_model, tokenizer, [r["text"] for r in rows])
    return {name: linear_probe_accuracy(x, labels, len(RELATIONS)) for name, x in states.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--clip", help="a saved CLIPModel folder (with its tokenizer)")
    source.add_argument("--text-encoder", help="a saved CLIPTextModel folder, e.g. a run's model/text_encoder")
    parser.add_argument("--data", required=True, help="the shapes dataset root (its test/ split is used)")
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(args.clip or args.text_encoder)
    model = (CLIPModel if args.clip else CLIPTextModel).from_pretrained(folder).eval()
    tokenizer_dir = folder if (folder / "vocab.json").is_file() else folder.parent / "tokenizer"  # an exported model
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_model = model.text_model if args.clip else model
    print("cosine of word states, per layer (embeddings, layer 1, ...):")
    for a, b in WORD_PAIRS:
        print(f"  {a:>8s} / {b:<8s} " + " ".join(f"{c:.3f}" for c in layer_similarities(text_model, tokenizer, a, b)))
    print(f"cosine of relation states in {RELATION_TEMPLATE!r}, per layer:")
    for a, b in RELATION_PAIRS:
        for token, cosines in relation_similarities(text_model, tokenizer, a, b).items():
            print(f"  {a:>8s} / {b:<8s} {token:<13s} " + " ".join(f"{c:.3f}" for c in cosines))
    if args.clip:
        pairs = load_pairs(Path(args.data) / "test", model.config.vision_config.image_size)
        for kind in ("shape", "colour", "relation"):
            score, total = swap_discrimination(model, tokenizer, pairs, args.images, kind)
            print(f"{kind} changed: true caption preferred {score:.3f} of {total}")
    for token, accuracy in relation_probe(text_model, tokenizer, Path(args.data)).items():
        print(f"relation read linearly from the {token}: {accuracy:.3f} held-out accuracy (chance 0.25)")


if __name__ == "__main__":
    main()
