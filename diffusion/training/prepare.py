"""First-use preparation of what training needs: the dataset and the text encoder.

The built-in shapes dataset and our tiny CLIP are built once, cached under `<cache_dir>` in a
folder named after a hash of the config that made them, and reused on every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

from diffusion.config import DataConfig, TextEncoderConfig
from diffusion.data.folder import METADATA_FILE, DatasetError
from diffusion.data.shapes import shapes_dir
from diffusion.files import atomic_dir, config_hash

logger = logging.getLogger(__name__)

TINY_CLIP = "tiny-clip"


def prepare_dataset(data: DataConfig, cache_dir: Path, progress: bool = True) -> tuple[Path, Path | None]:
    """The (train, test) folders for `data`: a user's folder as it is, or the cached shapes set."""
    if data.dataset != "shapes":
        train, test = user_dataset(data, cache_dir, progress)
        if data.test_fraction > 0 and (train / METADATA_FILE).is_file():  # (without one, the loader says what a folder needs)
            if test is not None:
                raise DatasetError(f"{data.dataset} has a test split already ({test}); drop data.test_fraction")
            return split_folder(train, data.test_fraction, cache_dir)
        return train, test
    out = shapes_dir(data.shapes, cache_dir)
    if (out / "dataset_info.json").is_file():
        logger.info("using the cached shapes dataset at %s", out)
    else:
        from diffusion.data.shapes import generate_shapes

        logger.info("generating the shapes dataset into %s (first use; cached for later runs)", out)
        generate_shapes(data.shapes, out, progress=progress)
    return out / "train", out / "test"


def user_dataset(data: DataConfig, cache_dir: Path, progress: bool) -> tuple[Path, Path | None]:
    """(train, test) imagefolders of data.dataset: a folder as it is (its train/ and test/ where it has them), or
    a dataset the datasets library reads, written into the cache on first use (diffusion.data.hub)."""
    from diffusion.data.hub import is_hub_id, materialise

    root = Path(data.dataset)
    if (root / METADATA_FILE).is_file() or (root / "train" / METADATA_FILE).is_file():
        train = root / "train" if (root / "train" / METADATA_FILE).is_file() else root
        return train, (root / "test" if (root / "test" / METADATA_FILE).is_file() else None)
    # A folder of the files a Hub dataset holds: parquet or arrow files at its top or one level down (data/).
    readable = root.is_dir() and any(any(root.glob(f"{level}*.{kind}")) for level in ("", "*/") for kind in ("parquet", "arrow"))
    if is_hub_id(data.dataset) or readable:
        key = config_hash({"dataset": dataset_source(data), "split": data.split, "image": data.image_column,
                           "caption": data.caption_column})
        out = Path(cache_dir) / "datasets" / f"{re.sub(r'[^A-Za-z0-9.-]+', '-', root.name)}-{key}"
        return materialise(data.dataset, data.split, data.image_column, data.caption_column, out,
                           Path(cache_dir) / "huggingface", progress)
    if root.is_dir():  # the loader says what such a folder needs
        return root, None
    raise DatasetError(
        f"data.dataset {root} is not a folder. Use 'shapes' for the built-in dataset, the path of a folder of "
        "images with a metadata.jsonl (columns file_name and text), or a Hugging Face Hub dataset id (owner/name)."
    )


def dataset_source(data: DataConfig) -> str:
    """What names a dataset of one's own in cache keys: a Hub id as it is, a folder by its absolute path."""
    from diffusion.data.hub import is_hub_id

    return data.dataset if is_hub_id(data.dataset) else str(Path(data.dataset).resolve())


def held_out(file_name: str, fraction: float) -> bool:
    """Whether a row belongs to the test split: a hash of its file name, as a number in [0, 1), below `fraction`."""
    return int(hashlib.sha256(file_name.encode()).hexdigest()[:12], 16) / 16**12 < fraction


def split_folder(root: Path, fraction: float, cache_dir: Path) -> tuple[Path, Path]:
    """(train, test) folders holding `fraction` of root's rows out as the test split: two metadata files in the
    cache whose paths point into root (left as it is). Bad rows stay in train, where the loader names them."""
    metadata = (root / METADATA_FILE).read_bytes()
    key = config_hash({"root": str(root.resolve()), "fraction": fraction, "metadata": hashlib.sha256(metadata).hexdigest()})
    out = Path(cache_dir) / "datasets" / f"{root.resolve().name}-split-{key}"
    if not (out / "test" / METADATA_FILE).is_file():
        parts: dict[str, list[str]] = {"train": [], "test": []}
        for line in metadata.decode("utf-8").splitlines():
            try:
                row = json.loads(line)
                name = row["file_name"]
                row.update({k: str((root / row[k]).resolve()) for k in ("file_name", "mask_file") if k in row})
                parts["test" if held_out(name, fraction) else "train"].append(json.dumps(row))
            except (json.JSONDecodeError, TypeError, KeyError):
                parts["train"].append(line)
        if not parts["test"]:
            raise DatasetError(f"data.test_fraction {fraction} holds out none of the {len(parts['train'])} rows of {root}; raise it")
        with atomic_dir(out) as tmp:
            for part, lines in parts.items():
                (tmp / part).mkdir()
                (tmp / part / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    held = len((out / "test" / METADATA_FILE).read_text(encoding="utf-8").splitlines())
    logger.info("test split: %d rows of %s held out (data.test_fraction %g), listed in %s", held, root, fraction, out / "test")
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
    if data.dataset == "shapes":
        from diffusion.data.shapes import FORMAT_VERSION

        source = {**asdict(data.shapes), "format": FORMAT_VERSION}  # a new format changes the captions it learns
    else:
        source = {"dataset": dataset_source(data)}
    # What else decides the pairs it learns from, in the key only where it differs from the default (so that
    # earlier caches stay valid).
    read = {key: getattr(data, key) for key in ("test_fraction", "caption_column", "skip_bad_rows", "image_column", "split")}
    source.update({k: v for k, v in read.items() if v != getattr(DataConfig(), k)})
    out = Path(cache_dir) / "text_encoders" / f"tiny-clip-{config_hash(source, asdict(text.tiny_clip))}"
    if (out / "config.json").is_file():
        logger.info("using the cached tiny CLIP at %s", out)
    else:
        from diffusion.text.tiny_clip import train_tiny_clip

        logger.info("training the tiny CLIP text encoder into %s (first use; cached for later runs)", out)
        metrics = train_tiny_clip(train_dir, out, text.tiny_clip, test_dir=test_dir, progress=progress,
                                  caption_column=data.caption_column, skip_bad_rows=data.skip_bad_rows)
        logger.info("tiny CLIP trained: %s", metrics)
    return str(out)
