"""Datasets read with the `datasets` library (a Hub id, or a local folder of parquet files), offline."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY
from diffusion.config import DataConfig
from diffusion.data.folder import CaptionedImageFolder, DatasetError
from diffusion.training.prepare import prepare_dataset

datasets = pytest.importorskip("datasets", reason='the datasets library is missing (pip install -e ".[hub]")')


def write_parquet_dataset(root, splits=("train", "test")):
    """A local dataset as the Hub stores one: data/<split>-*.parquet with an image and a caption column."""
    (root / "data").mkdir(parents=True)
    for split in splits:
        images = [Image.new("RGBA", (12 + k, 10), (40 * k, 0, 0, 255)) for k in range(4)]  # odd sizes, with alpha
        words = [[f"{split} red {k}"] + ([f"{split} crimson {k}"] if k == 0 else []) for k in range(4)]  # lists of captions
        rows = datasets.Dataset.from_dict({"picture": images, "words": words, "n": list(range(4))})
        rows.cast_column("picture", datasets.Image()).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_a_parquet_dataset_is_written_once_as_an_imagefolder_and_read_like_one(tmp_path):
    source = write_parquet_dataset(tmp_path / "hub-copy")
    data = DataConfig(dataset=str(source), image_column="picture", caption_column="words", image_size=8)
    train_dir, test_dir = prepare_dataset(data, tmp_path / "cache", progress=False)
    assert train_dir.parent.parent == tmp_path / "cache" / "datasets" and test_dir == train_dir.parent / "test"
    train = CaptionedImageFolder(train_dir, 8, "words")
    assert train.caption_sets[0] == ("train red 0", "train crimson 0") and train.captions[1:] == ["train red 1", "train red 2", "train red 3"]
    assert train.images.shape == (4, 3, 8, 8) and train.rows[2]["n"] == 2
    assert torch.equal(train.images[3, :, 0, 0], torch.tensor([120, 0, 0], dtype=torch.uint8))
    assert CaptionedImageFolder(test_dir, 8, "words").captions == [f"test red {k}" for k in range(4)]
    # Cached: a second start reads the written folder, not the library's copy.
    written = (train_dir / "metadata.jsonl").stat().st_mtime_ns
    assert prepare_dataset(data, tmp_path / "cache", progress=False)[0] == train_dir
    assert (train_dir / "metadata.jsonl").stat().st_mtime_ns == written


def test_missing_columns_and_splits_are_named(tmp_path):
    source = write_parquet_dataset(tmp_path / "hub-copy", splits=("train",))
    with pytest.raises(DatasetError, match=r"no column 'image' \(its columns: picture, words, n\); set data.image_column"):
        prepare_dataset(DataConfig(dataset=str(source), caption_column="words"), tmp_path / "cache", progress=False)
    with pytest.raises(DatasetError, match="no split 'validation' .* set data.split"):
        prepare_dataset(DataConfig(dataset=str(source), split="validation"), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache" / "datasets").iterdir())  # a failed start leaves nothing behind, staged or not


def test_a_hub_id_offline_says_how_to_use_a_local_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--device", "cpu", "--config", str(TINY), f"cache_dir={tmp_path / 'cache'}",
         "data.dataset=someone/captioned-pictures", "--output-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot reach the Hugging Face Hub for data.dataset 'someone/captioned-pictures'" in result.stderr
    assert "metadata.jsonl" in result.stderr and not (tmp_path / "run").exists()
