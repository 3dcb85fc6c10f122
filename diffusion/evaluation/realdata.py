"""Generation quality on a captioned dataset of your own, judged by the dataset's own tiny CLIP (no pretrained network).

The judge is a tiny CLIP trained on the run's training captions with another seed than the one `train.py`
trains for the UNet (cached beside it on first use), with both its towers as they were trained together.
It shares no weights with the text tower the UNet reads: a judge whose text tower is the UNet's own
(frozen) or its starting point (fine-tuned) scores the model's images in the very text space the UNet
learned to follow, and ranked held-out captions 0.42 against 0.17 for an independent judge of the same
images (BENCHMARKS.md).

R-precision (as in AttnGAN and later text-to-image papers): the judge ranks an image's caption against
99 other captions of the dataset; the score is the share of images whose own caption comes first.
KID (Binkowski et al. 2018): the unbiased squared MMD, with the cubic polynomial kernel, between two sets
of the judge's image embeddings (x 1000, mean and spread over random subsets); 0 for identical
distributions. Each is reported for the generated images and, on the same captions, for:
- real: the dataset's own images (the ceiling: what the judge can tell at all);
- blurred real: those images blurred until only colours and their layout remain (what colour blobs score);
- random training image: any training image, whatever its caption (what ignoring the prompt scores; its
  KID is the distance between two real samples of the dataset).
The judge is small and was trained on this data: these numbers rank models of the same dataset and show
how far generation is from the real images; they are not comparable across datasets or with FID/CLIP scores
from large pretrained networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from diffusion.errors import UserError

CANDIDATES = 100  # captions the judge chooses among: the image's own and 99 others
KID_SUBSETS = 50
BLUR_FRACTION = 0.15  # Gaussian blur radius, as a fraction of the image side
JUDGE_SEED_OFFSET = 1  # the judge's tiny CLIP seed, past the UNet's: independent of the text tower it reads


@dataclass
class Judge:
    """The dataset's own CLIP: normalised embeddings of images (PIL) and captions."""

    model: object  # transformers.CLIPModel
    tokenizer: object  # transformers.CLIPTokenizer
    source: str

    @classmethod
    def for_run(cls, cfg) -> Judge:
        from dataclasses import replace

        from transformers import CLIPModel, CLIPTokenizer

        from diffusion.training.prepare import TINY_CLIP, prepare_text_encoder

        tiny = cfg.text_encoder.tiny_clip
        text = replace(cfg.text_encoder, name=TINY_CLIP, tiny_clip=replace(tiny, seed=tiny.seed + JUDGE_SEED_OFFSET))
        source = prepare_text_encoder(text, cfg.data, Path(cfg.cache_dir))
        return cls(CLIPModel.from_pretrained(source).eval(), CLIPTokenizer.from_pretrained(source), source)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, P) unit vectors; pixels scaled to [-1, 1] as the judge was trained."""
        from diffusion.data.folder import resize_and_centre_crop
        from diffusion.text.tiny_clip import projected

        size = self.model.config.vision_config.image_size
        pixels = torch.stack([
            torch.from_numpy(np.array(resize_and_centre_crop(im.convert("RGB"), size))).permute(2, 0, 1)
            for im in images
        ]).float() / 127.5 - 1.0  # (N, 3, S, S)
        return torch.cat([F.normalize(projected(self.model.get_image_features(pixel_values=chunk)), dim=-1)
                          for chunk in pixels.split(256)])

    @torch.no_grad()
    def captions(self, captions: list[str]) -> torch.Tensor:
        """(N, P) unit vectors."""
        from diffusion.text.tiny_clip import projected, tokenize_all

        config = self.model.config.text_config
        ids, mask = tokenize_all(self.tokenizer, captions, min(self.tokenizer.model_max_length, config.max_position_embeddings))
        return torch.cat([
            F.normalize(projected(self.model.get_text_features(input_ids=i, attention_mask=m)), dim=-1)
            for i, m in zip(ids.split(1024), mask.split(1024))
        ])


def candidate_sets(true: list[int], pool_size: int, seed: int = 0) -> torch.Tensor:
    """(N, CANDIDATES) caption indices into a pool of distinct captions: each row's own first, then 99 others."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for own in true:
        others = torch.randperm(pool_size - 1, generator=generator)[: CANDIDATES - 1]
        others = others + (others >= own).long()  # skip the row's own caption
        rows.append(torch.cat([torch.tensor([own]), others]))
    return torch.stack(rows)


def r_precision(images: torch.Tensor, captions: torch.Tensor, candidates: torch.Tensor) -> float:
    """Share of images whose own caption (column 0 of `candidates`) is the judge's first choice.
    images (N, P), captions (pool, P), candidates (N, C) indices into the pool."""
    similarity = torch.einsum("np,ncp->nc", images, captions[candidates])  # (N, C)
    # A tie with another caption (one that tokenises the same, say) is a miss: the own caption must win outright.
    return (similarity[:, 0] > similarity[:, 1:].max(dim=1).values).float().mean().item()


def kid(x: torch.Tensor, y: torch.Tensor, subsets: int = KID_SUBSETS, seed: int = 0) -> tuple[float, float]:
    """KID x 1000 between unit embeddings x (N, P) and y (M, P): mean and std over random subsets of up to 100.

    The kernel is KID's (a.b / d + 1)^3 on features scaled to norm sqrt(d), i.e. (a.b + 1)^3 on unit vectors.
    Two sets of exactly the subset size have one subset, the whole sets: its value, and a spread of 0."""
    size = min(len(x), len(y), 100)
    if size < 2:
        raise ValueError("KID needs at least 2 images on each side")
    if len(x) == len(y) == size:
        subsets = 1
    generator = torch.Generator().manual_seed(seed)
    off_diagonal = 1 - torch.eye(size, dtype=torch.float64)
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=generator)[:size]].double()  # (n, P)
        b = y[torch.randperm(len(y), generator=generator)[:size]].double()  # (n, P)
        kxx, kyy, kxy = ((a @ a.T + 1) ** 3, (b @ b.T + 1) ** 3, (a @ b.T + 1) ** 3)  # (n, n) each
        # Unbiased MMD^2: the within-set means leave out the diagonal; minus twice the cross mean.
        within = ((kxx + kyy) * off_diagonal).sum() / (size * (size - 1))
        values.append(1000 * (within - 2 * kxy.mean()).item())
    values = torch.tensor(values)
    return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)


def blurred(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=BLUR_FRACTION * image.width))


@dataclass
class Split:
    """One split's chosen captions (distinct; no two share a file name, across splits too), a real image of each,
    and as many random training images (none of them this split's own)."""

    name: str  # "held-out captions" or "training captions"
    captions: list[str]
    real: list[Image.Image]
    random: list[Image.Image]


def read_splits(cfg, n_captions: int, seed: int = 0) -> tuple[list[Split], list[str]]:
    """The held-out split (where the run has a test split) and the training split, and every distinct caption
    of the dataset: the pool the judge chooses among."""
    from diffusion.data.folder import CaptionedImageFolder
    from diffusion.maps.export import slug
    from diffusion.sampling.pipeline import to_pil
    from diffusion.training.prepare import prepare_dataset

    d = cfg.data
    folders = dict(zip(("training captions", "held-out captions"), prepare_dataset(d, Path(cfg.cache_dir), progress=False)))
    loaded = {name: CaptionedImageFolder(folder, d.image_size, d.caption_column, d.skip_bad_rows, progress=False)
              for name, folder in folders.items() if folder is not None}
    pool = list(dict.fromkeys(c for data in loaded.values() for c in data.captions))
    if len(pool) < CANDIDATES:
        raise UserError(f"{d.dataset} has {len(pool)} distinct captions; R-precision ranks each image's among {CANDIDATES}")

    def images(data, rows: list[int]) -> list[Image.Image]:  # only the rows needed, as pictures
        return to_pil(data.images[rows].float() / 127.5 - 1) if rows else []

    generator, taken, splits = torch.Generator().manual_seed(seed), set(), []
    train = loaded["training captions"]
    for name in ("held-out captions", "training captions"):
        if name not in loaded:
            continue
        data, chosen = loaded[name], {}  # caption -> its row, in a seeded order
        for row in torch.randperm(len(data), generator=generator).tolist():
            caption = data.captions[row]
            if len(chosen) < n_captions and caption not in chosen and slug(caption) not in taken:
                chosen[caption] = row
                taken.add(slug(caption))
        own = set(chosen.values()) if data is train else set()
        others = [r for r in torch.randperm(len(train), generator=generator).tolist() if r not in own][: len(chosen)]
        splits.append(Split(name, list(chosen), images(data, list(chosen.values())), images(train, others)))
    return splits, pool


def score_split(judge: Judge, split: Split, generated: list[list[Image.Image]], pool: list[str],
                pool_embeddings: torch.Tensor, seed: int = 0) -> dict:
    """R-precision and KID of the generated images (generated[i]: the seeds of caption i) beside the baselines."""
    own = [pool.index(c) for c in split.captions]
    sets = {
        "generated": [image for images in generated for image in images],
        "real": split.real,
        "blurred real": [blurred(image) for image in split.real],
        "random training image": split.random,
    }
    owners = {"generated": [i for i, images in zip(own, generated) for _ in images], "random training image": own[: len(split.random)]}
    reference = judge.images(split.real)
    rows = {}
    for name, images in sets.items():
        embeddings = judge.images(images)
        candidates = candidate_sets(owners.get(name, own), len(pool), seed)
        row = {"images": len(images), "r_precision": r_precision(embeddings, pool_embeddings, candidates)}
        if name != "real":
            row["kid_x1000"], row["kid_std"] = kid(embeddings, reference, seed=seed)
        rows[name] = row
    return {"split": split.name, "captions": len(split.captions), "rows": rows}
