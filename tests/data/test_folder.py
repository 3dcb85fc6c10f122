"""CaptionedImageFolder: user-style folders, centre crops, bad rows, hflip, the shapes dataset."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.folder import CaptionedImageFolder, DatasetError, swap_left_right
from diffusion.data.shapes import generate_shapes
from diffusion.data.vocabulary import ShapesConfig

WIDTH, HEIGHT = 40, 50


def gradient_image(seed: int) -> Image.Image:
    """40 wide x 50 tall; red channel = 4 * row, so a crop's first row is easy to recognise."""
    rgb = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[..., 0] = 4 * np.arange(HEIGHT)[:, None]
    rgb[..., 1] = np.arange(WIDTH)[None, :]  # column index, to check flips
    rgb[..., 2] = seed
    return Image.fromarray(rgb)


def write_folder(root: Path, captions: list[str], column: str = "prompt") -> Path:
    (root / "pics").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for k, caption in enumerate(captions):
            gradient_image(k).save(root / "pics" / f"{k}.png")
            f.write(json.dumps({"file_name": f"pics/{k}.png", column: caption}) + "\n")
    return root


def append_line(root: Path, line: str) -> None:
    with open(root / "metadata.jsonl", "a") as f:
        f.write(line + "\n")


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "user", ["a cat left of a dog", "a red circle", "a blue star"])


def test_reads_user_folder_with_custom_caption_column(folder):
    data = CaptionedImageFolder(folder, image_size=WIDTH, caption_column="prompt")
    assert len(data) == 3 and data.skipped == 0
    assert data.images.shape == (3, 3, WIDTH, WIDTH) and data.images.dtype == torch.uint8
    item = data[1]
    assert item["caption"] == "a red circle" and item["index"] == 1
    pixels = item["pixel_values"]
    assert pixels.shape == (3, WIDTH, WIDTH) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    # Centre crop of 50 rows to 40 drops 5 rows at the top: the first kept row is row 5.
    first_row_red = (pixels[0, 0, 0] + 1) * 127.5
    assert first_row_red.round().item() == 4 * 5
    assert data.rows[1] == {"file_name": "pics/1.png", "prompt": "a red circle"}


def test_resizes_shorter_side_then_crops(folder):
    data = CaptionedImageFolder(folder, image_size=16, caption_column="prompt")
    assert data[0]["pixel_values"].shape == (3, 16, 16)
    # Shrinking 40x50 to 16x20 keeps the vertical gradient increasing down the crop.
    red = data.images[0, 0].float().mean(dim=1)
    assert (red[1:] > red[:-1]).all()


def test_missing_metadata_says_what_is_needed(tmp_path):
    with pytest.raises(DatasetError, match="metadata.jsonl.*file_name"):
        CaptionedImageFolder(tmp_path, image_size=32)


def test_points_at_split_when_given_dataset_root(tmp_path):
    generate_shapes(ShapesConfig(num_train=3, num_test=3), tmp_path / "shapes", progress=False)
    with pytest.raises(DatasetError, match="train"):
        CaptionedImageFolder(tmp_path / "shapes", image_size=32)


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        (json.dumps({"file_name": "pics/nope.png", "prompt": "a ghost"}), "does not exist"),
        (json.dumps({"file_name": "pics/garbage.png", "prompt": "noise"}), "cannot be read as an image"),
        (json.dumps({"file_name": "pics/0.png", "prompt": "  "}), "empty"),
        (json.dumps({"file_name": "pics/0.png", "text": "wrong column"}), "no caption column 'prompt'"),
        ('{"file_name": "pics/0.png", "prompt": ', "not valid JSON"),
    ],
)
def test_bad_row_names_file_row_and_fix(folder, bad_line, expected):
    (folder / "pics" / "garbage.png").write_bytes(b"\x89PNG this is not really an image")
    append_line(folder, bad_line)
    with pytest.raises(DatasetError) as err:
        CaptionedImageFolder(folder, image_size=WIDTH, caption_column="prompt")
    message = str(err.value)
    assert expected in message
    assert "metadata.jsonl, row 4" in message
    assert "data.skip_bad_rows: true" in message


def test_skip_bad_rows_skips_and_counts(folder):
    (folder / "pics" / "garbage.png").write_bytes(b"not an image at all")
    append_line(folder, json.dumps({"file_name": "pics/nope.png", "prompt": "a ghost"}))
    append_line(folder, json.dumps({"file_name": "pics/garbage.png", "prompt": "noise"}))
    append_line(folder, json.dumps({"file_name": "pics/0.png", "prompt": ""}))
    append_line(folder, "{oops")
    with pytest.warns(UserWarning, match="skipped 4 of 7 rows"):
        data = CaptionedImageFolder(folder, image_size=WIDTH, caption_column="prompt", skip_bad_rows=True)
    assert len(data) == 3 and data.skipped == 4
    assert data.skipped_reasons == {"missing image": 1, "unreadable image": 1, "empty caption": 1, "bad JSON": 1}
    assert data.captions == ["a cat left of a dog", "a red circle", "a blue star"]


def test_every_row_bad_is_an_error(tmp_path):
    tmp_path.joinpath("metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a"}) + "\n")
    with pytest.raises(DatasetError, match="every row is unusable"):
        CaptionedImageFolder(tmp_path, image_size=32, skip_bad_rows=True)


def test_hflip_mirrors_image_and_swaps_left_right(folder):
    plain = CaptionedImageFolder(folder, image_size=WIDTH, caption_column="prompt")
    flipping = CaptionedImageFolder(folder, image_size=WIDTH, caption_column="prompt", hflip=True)
    original = plain[0]["pixel_values"]
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        item = flipping[0]
        if item["caption"] == "a cat right of a dog":
            assert torch.equal(item["pixel_values"], original.flip(-1))
            seen.add("flipped")
        else:
            assert item["caption"] == "a cat left of a dog"
            assert torch.equal(item["pixel_values"], original)
            seen.add("plain")
    assert seen == {"flipped", "plain"}
    assert all(plain[0]["caption"] == "a cat left of a dog" for _ in range(5))


def test_swap_left_right_whole_words_only():
    assert swap_left_right("a left b right c leftover") == "a right b left c leftover"


def test_reads_generated_shapes(tmp_path):
    out = generate_shapes(ShapesConfig(num_train=5, num_test=2), tmp_path / "shapes", progress=False)
    data = CaptionedImageFolder(out / "train", image_size=32)
    assert len(data) == 5 and data.images.shape == (5, 3, 32, 32)
    assert data.captions[0] == data.rows[0]["text"] and "objects" in data.rows[0]
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4


def test_masks_and_word_objects_load_and_mirror_with_the_image(tmp_path):
    out = generate_shapes(ShapesConfig(num_train=6, num_test=2, max_objects=2), tmp_path / "shapes", progress=False)
    data = CaptionedImageFolder(out / "train", image_size=32, masks=True, hflip=True)
    assert data.masks.shape == (6, 32, 32) and data.word_objects[0] == data.rows[0]["word_objects"]
    torch.manual_seed(0)
    for _ in range(4):
        batch = data.batch(torch.arange(6))
        for pixels, mask in zip(batch.pixels, batch.masks):
            # Every object pixel has a palette colour, every background pixel is white: mask and image agree.
            white = (pixels == 1.0).all(dim=0)
            assert torch.equal(white, mask == 0)
        assert batch.word_objects == data.word_objects


def test_grounding_needs_masks_and_names_the_fix(folder):
    with pytest.raises(DatasetError, match="mask_file.*word_objects.*grounding_weight: 0"):
        CaptionedImageFolder(folder, image_size=WIDTH, caption_column="prompt", masks=True)


def test_word_objects_must_match_the_caption(tmp_path):
    out = generate_shapes(ShapesConfig(num_train=3, num_test=1), tmp_path / "shapes", progress=False)
    metadata = out / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[1]["word_objects"] = rows[1]["word_objects"][:-1]
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="row 2 .*one object id .* per caption word"):
        CaptionedImageFolder(out / "train", image_size=32, masks=True)


def test_test_fraction_holds_out_rows_by_file_name_and_leaves_the_folder_as_it_is(tmp_path):
    from diffusion.config import DataConfig
    from diffusion.training.prepare import prepare_dataset

    root = write_folder(tmp_path / "user", [f"caption {k}" for k in range(40)])
    before = (root / "metadata.jsonl").read_bytes()
    data = DataConfig(dataset=str(root), caption_column="prompt", test_fraction=0.25)
    train_dir, test_dir = prepare_dataset(data, tmp_path / "cache")
    train, test = (CaptionedImageFolder(d, WIDTH, caption_column="prompt") for d in (train_dir, test_dir))
    assert len(train) + len(test) == 40 and 4 <= len(test) <= 16  # ~10 of 40 by hash
    assert not set(train.captions) & set(test.captions) and (root / "metadata.jsonl").read_bytes() == before
    k = int(test.captions[0].split()[1])  # the rows' images are the folder's own
    assert torch.equal(test.images[0], CaptionedImageFolder(root, WIDTH, caption_column="prompt").images[k])
    # The same rows stay held out when images are added (a hash of each file name decides).
    append_line(root, json.dumps({"file_name": "pics/0.png", "prompt": "one more"}))
    _, grown = prepare_dataset(data, tmp_path / "cache")
    assert grown != test_dir and set(test.captions) <= set(CaptionedImageFolder(grown, WIDTH, caption_column="prompt").captions)
    (root / "test").mkdir()
    (root / "test" / "metadata.jsonl").write_text("")
    with pytest.raises(DatasetError, match="has a test split already"):
        prepare_dataset(data, tmp_path / "cache")


def test_a_row_with_several_captions_draws_one_per_use_and_all_are_known(tmp_path):
    from diffusion.text.tiny_clip import load_pairs

    root = write_folder(tmp_path / "user", ["a cat", "a dog"], column="text")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = ["a cat", "a small kitten ", "a cat"]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = CaptionedImageFolder(root, WIDTH)
    assert data.caption_sets == [("a cat", "a small kitten", "a cat"), ("a dog",)] and data.captions == ["a cat", "a dog"]
    assert data.all_captions == ["a cat", "a small kitten", "a dog"]  # what the text cache must hold
    torch.manual_seed(0)
    drawn = [data.batch(torch.tensor([0, 1])).captions for _ in range(40)]
    assert {d[0] for d in drawn} == {"a cat", "a small kitten"} and {d[1] for d in drawn} == {"a dog"}
    pairs = load_pairs(root, WIDTH)  # the tiny CLIP learns every caption of its image
    assert pairs.captions == ["a cat", "a small kitten", "a cat", "a dog"] and torch.equal(pairs.images[1], data.images[0])
    append_line(root, json.dumps({"file_name": "pics/0.png", "text": []}))
    with pytest.raises(DatasetError, match="row 3 has an empty or non-text caption"):
        CaptionedImageFolder(root, WIDTH)


def test_transparent_greyscale_and_palette_images_load_as_rgb_on_white(tmp_path):
    (tmp_path / "pics").mkdir()
    red = Image.new("RGBA", (20, 30), (0, 0, 0, 0))  # odd-sized, transparent black but for a half-opaque red block
    red.paste((255, 0, 0, 128), (0, 10, 20, 20))
    images = {"rgba.png": red, "la.png": red.convert("LA"), "grey.png": Image.new("L", (8, 8), 100)}
    for name, image in images.items():
        image.save(tmp_path / "pics" / name)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"pics/{n}", "text": n}) + "\n" for n in images))
    data = CaptionedImageFolder(tmp_path, 20)
    rgba, la, grey = (data.images[i].permute(1, 2, 0) for i in range(3))  # (20, 20, 3) each
    assert rgba[0, 0].tolist() == [255, 255, 255] and la[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert rgba[10, 10].tolist() == [255, 127, 127]  # half-opaque red over white: pink
    assert grey[5, 5].tolist() == [100, 100, 100]


def test_a_large_set_is_decoded_into_a_mapped_file_not_memory(folder, tmp_path, monkeypatch):
    import diffusion.data.folder as loader

    in_memory = CaptionedImageFolder(folder, WIDTH, caption_column="prompt")
    assert in_memory.storage.startswith("decoded in memory")
    monkeypatch.setattr(loader, "MEMORY_LIMIT", 3 * 3 * WIDTH * WIDTH - 1)  # three images are over the limit
    spilled = CaptionedImageFolder(folder, WIDTH, caption_column="prompt", spill_dir=tmp_path / "spill")
    assert spilled.storage.startswith(f"decoded into a file in {tmp_path / 'spill'} mapped into memory")
    assert torch.equal(spilled.images, in_memory.images) and torch.equal(spilled.batch(torch.tensor([2])).pixels, in_memory.batch(torch.tensor([2])).pixels)
    assert list((tmp_path / "spill").iterdir()) == []  # an unnamed file: nothing is left behind


def test_a_mask_loads_as_object_ids_or_as_grey_levels_resized_like_the_images(tmp_path):
    from diffusion.data.folder import BadRow, load_mask

    ids = np.zeros((8, 8), dtype=np.uint8)
    ids[:4, :4], ids[4:, 4:] = 1, 2  # object 1 top left, object 2 bottom right
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255, 40, 40, 40] + [0] * 759)  # what a viewer shows: black, white, dark grey
    palette.save(tmp_path / "objects.png")
    quadrants = ids[::2, ::2]  # (4, 4): each object's quadrant
    assert np.array_equal(load_mask(tmp_path / "objects.png", 4), quadrants)  # the palette indices: object ids
    assert np.array_equal(load_mask(tmp_path / "objects.png", 4, grey=True), np.choose(quadrants, [0, 255, 40]))
    # A picture of any mode (a user's --masks file) as its grey levels; a mask of object ids must be 8-bit.
    Image.fromarray(np.stack([ids * 100] * 3, axis=-1)).save(tmp_path / "rgb.png")
    assert np.array_equal(load_mask(tmp_path / "rgb.png", 16, grey=True), np.kron(ids * 100, np.ones((2, 2), dtype=np.uint8)))
    with pytest.raises(BadRow, match="mode RGB; save it as 8-bit greyscale"):
        load_mask(tmp_path / "rgb.png", 16)
    # Not square: the shorter side to `size`, then the centre square, as the images.
    wide = np.zeros((4, 8), dtype=np.uint8)
    wide[:, 2:6] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert np.array_equal(load_mask(tmp_path / "wide.png", 4, grey=True), np.full((4, 4), 255))
