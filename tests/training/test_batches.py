"""Training batches assembled from device tables: the same rows, pixels, captions and grounding targets as the
dataset's own batch, mirrored and dropped consistently, without the host in each step."""

import torch

from diffusion.data.folder import CaptionedImageFolder, swap_left_right
from diffusion.text.encoder import TextEncoder
from diffusion.training.batches import BatchOrder, TrainingBatches
from diffusion.training.grounding import TokenObjectTable
from diffusion.training.prepare import prepare_dataset, prepare_text_encoder
from diffusion.training.text_states import CaptionRows

from conftest import tiny_config


def test_batches_match_the_datasets_own_rows_with_mirrors_and_dropped_captions(cache_dir):
    cfg = tiny_config(cache_dir, "train.caption_dropout=0.3")
    train_dir, _ = prepare_dataset(cfg.data, cache_dir, progress=False)
    encoder = TextEncoder.from_pretrained(prepare_text_encoder(cfg.text_encoder, cfg.data, cache_dir, progress=False))
    dataset = CaptionedImageFolder(train_dir, 16, masks=True, hflip=True, progress=False)
    captions = CaptionRows([*dataset.all_captions, *(swap_left_right(c) for c in dataset.all_captions)])
    table = TokenObjectTable(encoder.tokenizer, encoder.max_length)
    batches = TrainingBatches(dataset, captions, table, cfg.train, torch.device("cpu"))
    order = BatchOrder(len(dataset), cfg.train.batch_size, cfg.train.seed, 0, 1)
    for micro_step in (0, 1, 45):  # 45: the second epoch's permutation
        torch.manual_seed(micro_step)
        images, caption_rows, grounding = batches(micro_step)
        # The same step by hand, from the dataset's rows and the same draws: mirror, then drop.
        torch.manual_seed(micro_step)
        rows = order.rows(micro_step)
        flip, dropped = torch.rand(len(rows)) < 0.5, torch.rand(len(rows)) < 0.3
        pixels = dataset.images[rows].float() / 127.5 - 1
        pixels[flip] = pixels[flip].flip(-1)
        texts = [swap_left_right(dataset.captions[r]) if f else dataset.captions[r] for r, f in zip(rows.tolist(), flip.tolist())]
        kept = ["" if d else c for c, d in zip(texts, dropped.tolist())]
        masks = dataset.masks[rows].clone()
        masks[flip] = masks[flip].flip(-1)
        assert flip.any() and (~flip).any() and dropped.any()  # both branches are exercised
        assert torch.equal(images, pixels)
        assert caption_rows.tolist() == [captions.row[c] for c in kept]
        assert torch.equal(grounding.token_objects, table(kept, [dataset.word_objects[r] for r in rows.tolist()]))
        assert torch.equal(grounding.masks, masks) and grounding.num_objects == dataset.num_objects


def test_a_row_with_several_captions_draws_each_of_them(tmp_path):
    from PIL import Image
    import json

    for i in range(4):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": [f"thing {i}", f"object {i}"]} for i in range(4)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = CaptionedImageFolder(tmp_path, 8, progress=False)
    captions = CaptionRows(dataset.all_captions)
    cfg = tiny_config(tmp_path / "cache", "train.batch_size=4", "train.caption_dropout=0")
    batches = TrainingBatches(dataset, captions, None, cfg.train, torch.device("cpu"))
    drawn = {captions.distinct[r] for step in range(20) for r in batches(step)[1].tolist()}
    assert drawn == set(dataset.all_captions)
