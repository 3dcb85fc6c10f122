"""The attention-map file format: what is written is what is read back, and a bad folder is named."""

import json

import numpy as np
import pytest

from diffusion.errors import UserError
from diffusion.maps.format import MANIFEST_VERSION, read_arrays, read_manifest, read_word_maps, write_maps


def manifest(words=("red", "circle"), layers=("down.0.cross_attn",)):
    tokens = ["<|startoftext|>", *words, "<|endoftext|>"]
    return {
        "image": "x.png", "prompt": " ".join(words), "tokens": tokens, "word_of_token": [None, 0, 1, None],
        "words": list(words), "start_token": 0, "end_token": 3, "layers": {name: 4 for name in layers},
        "layers_saved": list(layers), "snapshot_steps": [2],
    }


def arrays(tokens=4, words=2, size=4):
    rng = np.random.default_rng(0)
    return {
        "global": rng.random((tokens, size, size), dtype=np.float32), "words": rng.random((words, size, size), dtype=np.float32),
        "layer/down.0.cross_attn": rng.random((tokens, size, size), dtype=np.float32),
        "step/2": rng.random((tokens, size, size), dtype=np.float32),
    }


def test_written_maps_and_manifest_read_back_exactly(tmp_path):
    folder = tmp_path / "x.attn"
    written = arrays()
    write_maps(folder, written, manifest())
    read = read_manifest(folder)
    assert read["version"] == MANIFEST_VERSION and read["arrays"]["file"] == "maps.npz"
    assert {k: read[k] for k in manifest()} == manifest()
    back = read_arrays(folder, read)
    assert set(back) == set(written) and all(np.array_equal(back[k], written[k]) for k in written)
    words, maps = read_word_maps(tmp_path / "x.png")
    assert words == ["red", "circle"] and np.array_equal(maps, written["words"])


def test_a_map_of_the_wrong_shape_or_a_missing_key_is_named(tmp_path):
    folder = tmp_path / "x.attn"
    write_maps(folder, {**arrays(), "words": np.zeros((3, 4, 4), np.float32)}, manifest())
    with pytest.raises(UserError, match=r"array words has shape \(3, 4, 4\), expected \(2, S, S\)"):
        read_arrays(folder, read_manifest(folder))
    broken = {k: v for k, v in manifest().items() if k != "end_token"}
    write_maps(folder, arrays(), broken)
    with pytest.raises(UserError, match="lacks the key\\(s\\) end_token"):
        read_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({**manifest(), "version": MANIFEST_VERSION + 1}))
    with pytest.raises(UserError, match=f"manifest version {MANIFEST_VERSION + 1}"):
        read_manifest(folder)
