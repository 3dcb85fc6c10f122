"""The shapes detector against the generator's own ground truth, on clean and noisy images."""

import json

import numpy as np
import pytest
from PIL import Image

from diffusion.evaluation.detector import detect
from diffusion.data.scenes import SceneObject
from diffusion.data.shapes import generate_shapes, render_scene
from diffusion.data.vocabulary import PALETTE
from diffusion.data.vocabulary import ShapesConfig

NUM_SCENES = 250


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A few hundred real dataset rows (1-3 objects each), read back from the files."""
    cfg = ShapesConfig(num_train=0, num_test=NUM_SCENES, seed=7)
    root = generate_shapes(cfg, tmp_path_factory.mktemp("shapes") / "data", progress=False)
    rows = [json.loads(line) for line in (root / "test" / "metadata.jsonl").read_text().splitlines()]
    palette = {c: PALETTE[c] for c in cfg.colours}
    return [(np.asarray(Image.open(root / "test" / r["file_name"]).convert("RGB")), r) for r in rows], palette


def accuracy(images, palette):
    """Per-object colour / shape / size accuracy, per-image count accuracy, and bbox errors (px)."""
    hits = {"colour": 0, "shape": 0, "size": 0}
    objects, counts_right, bbox_errors = 0, 0, []
    for image, row in images:
        detections = detect(image, palette)
        counts_right += len(detections) == len(row["objects"])
        for obj in row["objects"]:
            objects += 1
            # The detection nearest the object's bbox centre (ground truth bboxes never overlap).
            x0, y0, x1, y1 = obj["bbox"]
            found = min(detections, key=lambda d: abs(d.centre[0] - (x0 + x1) / 2) + abs(d.centre[1] - (y0 + y1) / 2))
            for key in hits:
                hits[key] += getattr(found, key) == obj[key]
            bbox_errors.append(max(abs(a - b) for a, b in zip(found.bbox, obj["bbox"])))
    return {k: v / objects for k, v in hits.items()}, counts_right / len(images), np.array(bbox_errors)


def test_detector_matches_ground_truth_on_dataset_images(dataset):
    images, palette = dataset
    per_object, count, bbox_errors = accuracy(images, palette)
    assert count >= 0.98, count
    assert per_object["colour"] >= 0.98 and per_object["shape"] >= 0.98, per_object
    assert per_object["size"] >= 0.98, per_object
    assert bbox_errors.max() <= 1, bbox_errors.max()


def test_detector_survives_noise_like_a_models_output(dataset):
    """Pixel noise and stray specks, as in generated images: still nearly right."""
    images, palette = dataset
    rng = np.random.default_rng(0)
    noisy = []
    for image, row in images[:100]:
        pixels = image.astype(np.float32) + rng.normal(0, 25, image.shape)
        specks = rng.integers(0, image.shape[0], size=(3, 2))
        pixels[specks[:, 0], specks[:, 1]] = PALETTE["blue"]
        noisy.append((pixels.clip(0, 255).astype(np.uint8), row))
    per_object, count, bbox_errors = accuracy(noisy, palette)
    assert count >= 0.95 and per_object["colour"] >= 0.95 and per_object["shape"] >= 0.9, (count, per_object)
    assert np.mean(bbox_errors <= 1) >= 0.95


def test_detector_is_deterministic(dataset):
    image, _ = dataset[0][0]
    first, second = detect(image), detect(image.copy())
    assert [d.to_dict() for d in first] == [d.to_dict() for d in second]


def test_touching_objects_of_two_colours_are_two_objects():
    objects = [
        SceneObject("square", "red", "medium", (10.0, 16.0), 6.0),
        SceneObject("square", "blue", "medium", (20.0, 16.0), 6.0),  # shares an edge with the red one
    ]
    image, _ = render_scene(objects, 32)
    found = sorted((d.colour, d.shape) for d in detect(image))
    assert found == [("blue", "square"), ("red", "square")]


def test_any_image_size_and_empty_images():
    cfg = ShapesConfig(num_train=0, num_test=0, image_size=16)
    image, _ = render_scene([SceneObject("circle", "green", "large", (8.0, 8.0), 4.0)], cfg.image_size)
    (found,) = detect(image)
    assert (found.colour, found.shape, found.bbox) == ("green", "circle", [4, 4, 12, 12])
    assert detect(np.full((64, 64, 3), 255, dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="square RGB"):
        detect(np.zeros((32, 16, 3), dtype=np.uint8))
