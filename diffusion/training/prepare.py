"""First-use preparation of what training needs: the dataset and the text encoder.

The built-in shapes dataset and our tiny CLIP are built once, cached under `<cache_dir>` in a
folder named after a hash of the config that made them, and reused on every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from diffusion.config import DataConfig, TextEncoderConfig
from diffusion.data.folder import DatasetError

logger = logging.getLogger(__name__)

TINY_CLIP = "tiny-clip"


def config_hash(*parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def shapes_dir(data: DataConfig, cache_dir: Path) -> Path:
    from diffusion.data.shapes import FORMAT_VERSION

    return Path(cache_dir) / "datasets" / f"shapes-{config_hash(asdict(data.shapes), {'format': FORMAT_VERSION})}"


def prepare_dataset(data: DataConfig, cache_dir: Path, progress: bool = True) -> tuple[Path, Path | None]:
    """The (train, test) folders for `data`: a user's folder as it is, or the cached shapes set."""
    if data.dataset != "shapes":
        root = Path(data.dataset)
        if not root.is_dir():
            raise DatasetError(
                f"data.dataset {root} is not a folder. Use 'shapes' for the built-in dataset or the path of "
                "a folder of images with a metadata.jsonl (columns file_name and text)."
            )
        train = root / "train" if (root / "train" / "metadata.jsonl").is_file() else root
        test = root / "test" if (root / "test" / "metadata.jsonl").is_file() else None
        return train, test
    out = shapes_dir(data, cache_dir)
    if (out / "dataset_info.json").is_file():
        logger.info("using the cached shapes dataset at %s", out)
    else:
        from diffusion.data.shapes import generate_shapes

        logger.info("generating the shapes dataset into %s (first use; cached for later runs)", out)
        generate_shapes(data.shapes, out, progress=progress)
    return out / "train", out / "test"


def prepare_text_encoder(
    text: TextEncoderConfig,
    data: DataConfig,
    cache_dir: Path,
    progress: bool = True,
    dataset_dirs: tuple[Path, Path | None] | None = None,
) -> str:
    """The name or path to load the text encoder from; trains our tiny CLIP on first use.

    `dataset_dirs`: the (train, test) folders when the caller has prepared them already.
    """
    if text.name != TINY_CLIP:
        return text.name
    train_dir, test_dir = dataset_dirs or prepare_dataset(data, cache_dir, progress)
    source = asdict(data.shapes) if data.dataset == "shapes" else {"dataset": str(Path(data.dataset).resolve())}
    out = Path(cache_dir) / "text_encoders" / f"tiny-clip-{config_hash(source, asdict(text.tiny_clip))}"
    if (out / "config.json").is_file():
        logger.info("using the cached tiny CLIP at %s", out)
    else:
        from diffusion.text.tiny_clip import train_tiny_clip

        logger.info("training the tiny CLIP text encoder into %s (first use; cached for later runs)", out)
        metrics = train_tiny_clip(train_dir, out, text.tiny_clip, test_dir=test_dir, progress=progress)
        logger.info("tiny CLIP trained: %s", metrics)
    return str(out)
