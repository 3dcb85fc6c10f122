"""Train our own tiny CLIP on a captioned image folder: the offline default text encoder.

A `transformers.CLIPModel` (small text transformer + small ViT) learns, contrastively, to match
each caption with its image. Its text tower then conditions the diffusion model, loaded exactly
like OpenAI's CLIP (`from_pretrained` on the saved folder). Images enter the vision tower as
the data loader gives them, in [-1, 1], with no CLIP mean/std normalisation.

    python -m diffusion.text.tiny_clip --data /tmp/shapes --out /tmp/tiny_clip
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from diffusion.data.folder import CaptionedImageFolder
from diffusion.files import atomic_dir
from diffusion.text.tiny_clip_config import TinyClipConfig
from diffusion.text.tokenizer import train_clip_tokenizer

INFO_FILE = "tiny_clip_info.json"
MAX_LOGIT_SCALE = math.log(100.0)  # OpenAI's CLIP clamps the learned temperature at 100
ADAM_BETAS = (0.9, 0.98)  # CLIP's choice for contrastive training
ADAM_EPS = 1e-6
WEIGHT_DECAY = 0.1  # on weight matrices only, as CLIP's training does


@dataclass
class CaptionedPairs:
    """A whole captioned image folder in memory."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    captions: list[str]
    rows: torch.Tensor  # (N,) the folder row of each pair: a row with several captions gives several pairs

    def pixel_values(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1], scaled as CaptionedImageFolder items are."""
        return self.images[index].float() / 127.5 - 1.0


def load_pairs(folder: str | Path, image_size: int, caption_column: str = "text", skip_bad_rows: bool = False) -> CaptionedPairs:
    dataset = CaptionedImageFolder(folder, image_size, caption_column, skip_bad_rows)
    if all(len(captions) == 1 for captions in dataset.caption_sets):
        return CaptionedPairs(dataset.images, list(dataset.captions), torch.arange(len(dataset.captions)))
    # One pair per caption: a row with several captions gives as many pairs of the same image.
    rows = torch.tensor([row for row, captions in enumerate(dataset.caption_sets) for _ in captions])
    captions = [caption for captions in dataset.caption_sets for caption in captions]
    return CaptionedPairs(dataset.images[rows], captions, rows)


def build_clip_config(cfg: TinyClipConfig, tokenizer: CLIPTokenizer) -> CLIPConfig:
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_mlp_width,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.projection_dim,
        **special_ids,
    )
    vision = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_width,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        intermediate_size=cfg.vision_mlp_width,
        projection_dim=cfg.projection_dim,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.projection_dim)


def tokenize_all(tokenizer: CLIPTokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, T) and attention mask (N, T) for every caption, padded to T = max_length."""
    encoded = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def contrastive_loss(logits_per_text: torch.Tensor, caption_ids: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, where images of the same caption and captions of the same image all count
    as matches (two captions of one row describe the same picture: neither is the other's negative).

    logits_per_text: (B, B) scaled cosine similarities, text i against image j.
    caption_ids: (B,) an id per distinct caption; row_ids: (B,) the folder row of each pair.
    """
    same_caption = caption_ids[:, None] == caption_ids[None, :]  # (B, B)
    same_image = row_ids[:, None] == row_ids[None, :]  # (B, B)
    positives = (same_caption | same_image).float()  # (B, B)
    targets = positives / positives.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1; symmetric matrix
    # 1. Text -> image: each caption picks its images among the batch's B images.
    text_to_image = F.cross_entropy(logits_per_text, targets)
    # 2. Image -> text: each image picks its caption among the B texts.
    image_to_text = F.cross_entropy(logits_per_text.T, targets)
    return (text_to_image + image_to_text) / 2



def lr_at(step: int, cfg: TinyClipConfig) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TinyClipConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices only, not on biases, LayerNorm gains or the temperature."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` index batches (batch_size,), walking through fresh random permutations of the items."""
    order = torch.randperm(num_items, generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > num_items:
            order, cursor = torch.randperm(num_items, generator=generator), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def batch_logits(model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """(N_text, B) scaled cosine similarities of every text against every image."""
    # Trim padding beyond the longest text: the text tower is causal, so its outputs are unchanged.
    length = int(attention_mask.sum(dim=1).max())
    text = projected(model.get_text_features(input_ids=input_ids[:, :length], attention_mask=attention_mask[:, :length]))
    image = projected(model.get_image_features(pixel_values=pixels))  # (B, P)
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)  # (N_text, P), (B, P)
    return model.logit_scale.exp() * text @ image.T  # (N_text, B)


def train_steps(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    pairs: CaptionedPairs,
    cfg: TinyClipConfig,
    progress: bool,
) -> float:
    """Contrastive training for cfg.steps steps; returns the mean loss of the last 20 steps."""
    id_of_caption = {caption: i for i, caption in enumerate(dict.fromkeys(pairs.captions))}
    caption_ids = torch.tensor([id_of_caption[caption] for caption in pairs.captions])  # (N,)
    input_ids, attention_mask = tokenize_all(tokenizer, pairs.captions, cfg.max_length)  # (N, T), (N, T)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch_size = min(cfg.batch_size, len(pairs.captions))
    recent_losses: list[float] = []
    model.train()
    index_batches = batches(len(pairs.captions), batch_size, cfg.steps, generator)
    bar = tqdm(index_batches, total=cfg.steps, desc="tiny CLIP", disable=not progress)
    for step, index in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        ids, mask = input_ids[index], attention_mask[index]  # (B, T), (B, T)
        logits = batch_logits(model, ids, mask, pairs.pixel_values(index))  # (B, B)
        loss = contrastive_loss(logits, caption_ids[index], pairs.rows[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
        recent_losses = (recent_losses + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    model.eval()
    return sum(recent_losses) / max(1, len(recent_losses))


def distinct_caption_indices(captions: list[str], n_pairs: int, seed: int) -> list[int]:
    """Up to n_pairs random indices whose captions are all different."""
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: dict[str, int] = {}
    for index in order:
        chosen.setdefault(captions[index], index)
        if len(chosen) == n_pairs:
            break
    return list(chosen.values())


def projected(features: torch.Tensor | object) -> torch.Tensor:
    """get_text_features / get_image_features give a tensor or, in newer transformers, an output object."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


@torch.no_grad()
def retrieval_accuracy(
    model_dir: str | Path,
    test_dir: str | Path,
    n_pairs: int = 100,
    seed: int = 0,
    caption_column: str = "text",
    skip_bad_rows: bool = False,
) -> dict[str, float]:
    """Text-to-image retrieval among n_pairs held-out pairs with distinct captions.

    For each caption, the n images are ranked by CLIP similarity; a hit is the image of that caption.
    """
    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir)
    pairs = load_pairs(test_dir, model.config.vision_config.image_size, caption_column, skip_bad_rows)
    chosen = distinct_caption_indices(pairs.captions, n_pairs, seed)
    captions = [pairs.captions[i] for i in chosen]
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    input_ids, attention_mask = tokenize_all(tokenizer, captions, max_length)  # (n, T), (n, T)
    text = F.normalize(projected(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)), dim=-1)  # (n, P)
    image = F.normalize(projected(model.get_image_features(pixel_values=pairs.pixel_values(chosen))), dim=-1)  # (n, P)
    similarity = text @ image.T  # (n, n): caption i against image j
    ranked = similarity.argsort(dim=1, descending=True)  # (n, n) image indices, best first
    # Captions are distinct, so image j shows caption i exactly when j == i.
    hits = ranked == torch.arange(len(captions))[:, None]  # (n, n)
    metrics = {
        "top1": hits[:, :1].any(dim=1).float().mean().item(),
        "top5": hits[:, :5].any(dim=1).float().mean().item(),
        "n_pairs": len(captions),
    }
    return metrics


def train_into(
    folder: Path, train_dir: str | Path, cfg: TinyClipConfig, test_dir: str | Path | None, progress: bool, columns: dict
) -> dict:
    """Train tokenizer and model, save both into `folder`, and measure retrieval from the saved files.
    `columns`: caption_column and skip_bad_rows, to read the folders as the UNet's training reads them."""
    # 1. Data in memory, a tokenizer learned on its captions.
    pairs = load_pairs(train_dir, cfg.image_size, **columns)
    tokenizer = train_clip_tokenizer(pairs.captions, folder, cfg.vocab_size, cfg.max_length)

    # 2. Contrastive training.
    model = CLIPModel(build_clip_config(cfg, tokenizer))
    final_loss = train_steps(model, tokenizer, pairs, cfg, progress)

    # 3. Save, then measure through the same from_pretrained path any CLIP takes.
    model.save_pretrained(folder)
    metrics: dict = {"final_loss": final_loss, "steps": cfg.steps, "train_pairs": len(pairs.captions)}
    if test_dir is not None:
        metrics["retrieval"] = retrieval_accuracy(folder, test_dir, cfg.retrieval_pairs, cfg.seed, **columns)
    return metrics


def train_tiny_clip(
    train_dir: str | Path,
    out_dir: str | Path,
    cfg: TinyClipConfig,
    test_dir: str | Path | None = None,
    progress: bool = True,
    caption_column: str = "text",
    skip_bad_rows: bool = False,
) -> dict:
    """Train the tokenizer and the tiny CLIP on `train_dir`, save both to `out_dir` (atomically), return metrics."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    with atomic_dir(Path(out_dir)) as staging:
        metrics = train_into(staging, train_dir, cfg, test_dir, progress, {"caption_column": caption_column, "skip_bad_rows": skip_bad_rows})
        metrics["train_seconds"] = round(time.time() - start, 1)
        info = {"config": asdict(cfg), **metrics}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
    return metrics


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.text.tiny_clip", description="Train the tiny CLIP text encoder on a captioned image folder."
    )
    parser.add_argument("--data", required=True, help="dataset root with train/ (and test/) imagefolder splits")
    parser.add_argument("--out", required=True, help="folder to save the CLIP model and tokenizer to")
    defaults = TinyClipConfig()
    for name, value in asdict(defaults).items():
        if not isinstance(value, list):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--caption-column", default="text", help="the metadata column of the captions (default text)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = TinyClipConfig(**{name: getattr(args, name) for name in asdict(TinyClipConfig())})
    data = Path(args.data)
    train_dir = data / "train" if (data / "train").is_dir() else data
    test_dir = data / "test" if (data / "test").is_dir() else None
    metrics = train_tiny_clip(train_dir, args.out, cfg, test_dir=test_dir, progress=not args.no_progress,
                              caption_column=args.caption_column)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
