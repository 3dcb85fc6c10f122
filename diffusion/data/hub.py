"""Datasets read through the Hugging Face `datasets` library: a Hub id such as `lambdalabs/naruto-blip-captions`,
or a local folder that `datasets.load_dataset` reads (parquet or arrow files), as diffusers' train_text_to_image.py
takes --dataset_name.

On first use each split is written into the cache in the imagefolder layout (the images as PNG files and a
metadata.jsonl), and from then on it is read like any folder of one's own (diffusion.data.folder): the same rows,
the same checks, offline. Delete the cached folder to fetch the dataset again.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from tqdm.auto import tqdm

from diffusion.data.folder import METADATA_FILE, DatasetError, to_rgb
from diffusion.files import atomic_dir

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name
TEST_SPLITS = ("test", "validation")  # the first of these a dataset has is its test split
INSTALL = 'pip install -e ".[hub]"'


def is_hub_id(name: str) -> bool:
    """`owner/name` that is not a folder here."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def load_dataset_dict(name: str, hf_cache: Path):
    """The dataset's splits (a datasets.DatasetDict), or a DatasetError that says what to do."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"data.dataset {name!r} is read with the datasets library, which is not installed: {INSTALL}") from None
    try:
        return datasets.load_dataset(name, cache_dir=str(hf_cache))
    except ConnectionError as error:  # offline (HF_HUB_OFFLINE=1) or no network
        raise DatasetError(
            f"cannot reach the Hugging Face Hub for data.dataset {name!r} ({error}; if you meant a folder here, "
            f"{Path(name).resolve()} does not exist). Without a network, point "
            "data.dataset at a local folder instead: image files plus a metadata.jsonl with one JSON row per image, "
            '{"file_name": "images/0001.png", "text": "a caption"}, or a folder of the parquet files the dataset '
            "has on the Hub."
        ) from None
    except FileNotFoundError as error:  # datasets' DatasetNotFoundError is one
        raise DatasetError(
            f"data.dataset {name!r} is neither a folder here nor a dataset on the Hub ({error}); check the name, or "
            "use 'shapes' or the path of a folder of images with a metadata.jsonl"
        ) from None
    except (ValueError, datasets.exceptions.DatasetGenerationError) as error:  # several configurations, unreadable files
        raise DatasetError(f"the datasets library cannot read data.dataset {name!r} as one dataset: {error}") from None


def choose_splits(splits: dict, name: str, train_split: str) -> tuple[str, str | None]:
    """(train split, test split or None) of a dataset's split names."""
    if train_split not in splits:
        raise DatasetError(f"{name} has no split {train_split!r} (it has {', '.join(splits)}); set data.split to one of them")
    test = next((s for s in TEST_SPLITS if s in splits and s != train_split), None)
    return train_split, test


def write_split(rows, folder: Path, image_column: str, caption_column: str, name: str, progress: bool) -> None:
    """One split as an imagefolder: images/NNNNNNN.png (RGB) and metadata.jsonl (the caption and other plain columns)."""
    missing = [c for c in (image_column, caption_column) if c not in rows.column_names]
    if missing:
        raise DatasetError(
            f"{name} has no column {missing[0]!r} (its columns: {', '.join(rows.column_names)}); set "
            f"data.{'image' if missing[0] == image_column else 'caption'}_column to the column that holds them"
        )
    (folder / "images").mkdir(parents=True)
    with open(folder / METADATA_FILE, "w", encoding="utf-8") as metadata:
        for k, row in enumerate(tqdm(rows, desc=f"writing {folder.name}", unit="img", disable=not progress)):
            image = row.pop(image_column)
            if not hasattr(image, "save"):
                raise DatasetError(f"{name}: column {image_column!r} holds {type(image).__name__}, not images; set data.image_column")
            file_name = f"images/{k:07d}.png"
            to_rgb(image).save(folder / file_name)  # any mode (CMYK, 16-bit, ...) as RGB, transparency on white
            plain = {key: value for key, value in row.items() if isinstance(value, (str, int, float, bool, list))}
            plain.pop("mask_file", None)  # (no masks come with such a dataset)
            metadata.write(json.dumps({**plain, "file_name": file_name}) + "\n")  # our file name, not a column of theirs


def materialise(name: str, train_split: str, image_column: str, caption_column: str, out: Path, hf_cache: Path,
                progress: bool = True) -> tuple[Path, Path | None]:
    """The (train, test) imagefolders of a `datasets` dataset in `out`, written there on first use."""
    if (out / "train" / METADATA_FILE).is_file():
        logger.info("using %s as cached in %s", name, out)
    else:
        splits = load_dataset_dict(name, hf_cache)
        train, test = choose_splits(splits, name, train_split)
        logger.info("writing %s (splits %s) into %s (first use; cached for later runs)", name, [train, test], out)
        with atomic_dir(out) as tmp:
            for part, split in (("train", train), ("test", test)):
                if split is not None:
                    write_split(splits[split], tmp / part, image_column, caption_column, name, progress)
    return out / "train", (out / "test" if (out / "test").is_dir() else None)
