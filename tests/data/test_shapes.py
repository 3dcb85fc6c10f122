"""The built-in shapes dataset: determinism, annotations that match the pixels, held-out splits."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion.data.vocabulary import ShapesConfig
from diffusion.data.scenes import SceneObject
from diffusion.data.shapes import generate_shapes, render_scene
from diffusion.data.vocabulary import BACKGROUND, PALETTE, SHAPE_NAMES, SIZE_FRACTIONS

SMALL = dict(num_train=300, num_test=200, image_size=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[ShapesConfig, Path]:
    cfg = ShapesConfig(**SMALL)
    return cfg, generate_shapes(cfg, tmp_path_factory.mktemp("shapes") / "data", progress=False)


def read_rows(split_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (split_dir / "metadata.jsonl").read_text().splitlines()]


def all_rows(out: Path) -> list[tuple[Path, dict]]:
    return [(out / split, row) for split in ("train", "test") for row in read_rows(out / split)]


def split_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_layout_and_info(dataset):
    cfg, out = dataset
    assert read_rows(out / "train")[0]["file_name"] == "images/000000.png"
    assert len(read_rows(out / "train")) == cfg.num_train
    assert len(read_rows(out / "test")) == cfg.num_test
    info = json.loads((out / "dataset_info.json").read_text())
    assert ShapesConfig(**info["config"]) == cfg
    assert info["palette"] == {c: list(PALETTE[c]) for c in cfg.colours}
    assert info["held_out_pairs"] == cfg.held_out_pairs
    assert info["held_out_relations"][: len(cfg.held_out_relations)] == cfg.held_out_relations
    assert info["counts"]["train"] == cfg.num_train
    assert not [p for p in out.parent.iterdir() if p.name != out.name], "temporary folder left behind"


def test_deterministic_for_a_seed(tmp_path, dataset):
    cfg, out = dataset
    again = generate_shapes(ShapesConfig(**SMALL), tmp_path / "again", progress=False)
    assert split_bytes(again) == split_bytes(out)
    other = generate_shapes(ShapesConfig(**SMALL, seed=1), tmp_path / "other", progress=False)
    assert read_rows(other / "train") != read_rows(out / "train")


def test_annotations_match_pixels(dataset):
    cfg, out = dataset
    for split_dir, row in all_rows(out):
        rgb = np.asarray(Image.open(split_dir / row["file_name"]))
        mask = np.asarray(Image.open(split_dir / row["mask_file"]))
        assert rgb.shape == (cfg.image_size, cfg.image_size, 3) and mask.dtype == np.uint8
        assert 1 <= len(row["objects"]) <= cfg.max_objects
        assert set(np.unique(mask)) == set(range(len(row["objects"]) + 1))
        assert (rgb[mask == 0] == BACKGROUND).all()
        for obj in row["objects"]:
            inside = mask == obj["mask_value"]
            assert (rgb[inside] == PALETTE[obj["colour"]]).all()
            ys, xs = np.nonzero(inside)
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_captions_state_objects_and_true_relations(dataset):
    _, out = dataset
    for _, row in all_rows(out):
        text, objects = row["text"], row["objects"]
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", text), text
        for obj in objects:
            size_word = {"small": "small ", "medium": "", "large": "large "}[obj["size"]]
            assert re.search(rf"\b(a|an) {size_word}{obj['colour']} {obj['shape']}\b", text), (text, obj)
        assert len(row["relations"]) == len(objects) - 1  # every object takes part in a clause
        for rel in row["relations"]:
            a, b = objects[rel["subject"]], objects[rel["reference"]]
            reference = rf"(a|an|the)( small| large)? {b['colour']} {b['shape']}"
            clause = rf"{a['colour']} {a['shape']} {rel['relation']} {reference}"
            assert re.search(clause, text), (text, rel)
            assert relation_holds(a["bbox"], rel["relation"], b["bbox"]), row


def relation_holds(a: list[int], relation: str, b: list[int]) -> bool:
    """Strictly separated, with at least one empty pixel between the two bboxes (x1, y1 exclusive)."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    return {"left of": ax1 < bx0, "right of": bx1 < ax0, "above": ay1 < by0, "below": by1 < ay0}[relation]


def held_out_in(row: dict, cfg: ShapesConfig) -> bool:
    objects = row["objects"]
    pairs = {f"{o['colour']} {o['shape']}" for o in objects}
    patterns = {
        f"{objects[r['subject']]['shape']} {r['relation']} {objects[r['reference']]['shape']}" for r in row["relations"]
    }
    converses = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    scenes = set(cfg.held_out_relations) | {
        f"{p.split()[-1]} {converses[' '.join(p.split()[1:-1])]} {p.split()[0]}" for p in cfg.held_out_relations
    }
    return bool(pairs & set(cfg.held_out_pairs) or patterns & scenes)


def test_held_out_compositions_only_in_test(dataset):
    cfg, out = dataset
    train, test = read_rows(out / "train"), read_rows(out / "test")
    assert not any(held_out_in(row, cfg) or row["held_out"] for row in train)
    assert not any(pair in row["text"] for row in train for pair in cfg.held_out_pairs)
    assert all(row["held_out"] == held_out_in(row, cfg) for row in test)
    assert 0 < sum(row["held_out"] for row in test) < len(test)
    test_objects = {f"{o['colour']} {o['shape']}" for row in test for o in row["objects"]}
    assert set(cfg.held_out_pairs) <= test_objects


def test_all_object_counts_and_sizes_occur(dataset):
    _, out = dataset
    rows = read_rows(out / "train")
    assert {len(row["objects"]) for row in rows} == {1, 2, 3}
    assert {o["size"] for row in rows if len(row["objects"]) == 3 for o in row["objects"]} == set(SIZE_FRACTIONS)


def test_refuses_to_overwrite(tmp_path):
    cfg = ShapesConfig(num_train=2, num_test=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_shapes(cfg, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    generate_shapes(cfg, tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "train" / "metadata.jsonl").is_file()


def test_render_scene_shapes_are_distinct_at_every_size():
    for size, fraction in SIZE_FRACTIONS.items():
        half = fraction * 32
        masks = {
            shape: render_scene([SceneObject(shape, "red", size, (16.0, 16.0), half)], 32)[1]
            for shape in SHAPE_NAMES
        }
        for shape, mask in masks.items():
            ys, xs = np.nonzero(mask == 1)
            assert xs.min() >= 16 - half - 0.5 and xs.max() <= 16 + half, (size, shape)
            assert ys.min() >= 16 - half - 0.5 and ys.max() <= 16 + half, (size, shape)
        patterns = {mask.tobytes() for mask in masks.values()}
        assert len(patterns) == len(SHAPE_NAMES)


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="colours"):
        ShapesConfig(colours=["red", "mauve"])
    with pytest.raises(ValueError, match="held-out pair"):
        ShapesConfig(held_out_pairs=["red hexagon"])
    with pytest.raises(ValueError, match="held-out relation"):
        ShapesConfig(held_out_relations=["circle near square"])


def test_word_objects_name_each_object_by_its_words(dataset):
    """word_objects marks exactly the size, colour and shape words of each mention of object k."""
    _, out = dataset
    for split_dir, row in all_rows(out):
        words, objects = row["text"].split(), row["word_objects"]
        assert len(objects) == len(words)
        mask = np.asarray(Image.open(split_dir / row["mask_file"]))
        for k, obj in enumerate(row["objects"], start=1):
            named = [w for w, o in zip(words, objects) if o == k]
            assert obj["colour"] in named and obj["shape"] in named, (row["text"], k)
            assert set(named) <= {obj["colour"], obj["shape"], "small", "large"}
            assert (mask == k).any()
        unnamed = {w for w, o in zip(words, objects) if o == 0}
        assert unnamed <= {"a", "an", "the", "and", "left", "right", "of", "above", "below"}, row["text"]



def stated_patterns(row: dict) -> set[str]:
    objects = row["objects"]
    return {f"{objects[r['subject']]['shape']} {r['relation']} {objects[r['reference']]['shape']}" for r in row["relations"]}


def test_a_held_out_relation_holds_out_the_scene_in_both_phrasings(tmp_path):
    # Two shapes only, so circle-square scenes are common: "circle above square" is held out, and so
    # is its converse "square below circle", which states the same scene.
    cfg = ShapesConfig(num_train=300, num_test=300, shapes=["circle", "square"], held_out_pairs=[],
                       held_out_relations=["circle above square"])
    out = generate_shapes(cfg, tmp_path / "data", progress=False)
    train, test = read_rows(out / "train"), read_rows(out / "test")
    phrasings = {"circle above square", "square below circle"}
    assert not any(stated_patterns(row) & phrasings for row in train)
    assert {"circle below square", "square above circle"} & set().union(*map(stated_patterns, train))
    flagged = set().union(*(stated_patterns(row) for row in test if row["held_out"]))
    assert phrasings <= flagged
    assert all(row["held_out"] == bool(stated_patterns(row) & phrasings) for row in test)
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["held_out_relations"] == ["circle above square", "square below circle"]


def test_the_prepared_dataset_is_where_shapes_dir_says_and_other_settings_go_elsewhere(cache_dir):
    from dataclasses import replace

    from diffusion.data.shapes import shapes_dir

    from conftest import tiny_config

    shapes = tiny_config(cache_dir).data.shapes
    assert (shapes_dir(shapes, cache_dir) / "dataset_info.json").is_file()
    assert shapes_dir(replace(shapes, seed=1), cache_dir) != shapes_dir(shapes, cache_dir)
