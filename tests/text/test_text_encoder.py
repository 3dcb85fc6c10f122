"""Tokenizer, frozen text encoder and tiny CLIP: tiny seeded CPU models, offline, seconds each."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from diffusion.training.text_states import TextStateCache, TunedTextStates
from diffusion.text.encoder import TextEncoder, TextEncoderLoadError
from diffusion.text.tiny_clip_config import TinyClipConfig
from diffusion.text.tiny_clip import build_clip_config, contrastive_loss, retrieval_accuracy, train_tiny_clip
from diffusion.text.tokenizer import END_OF_WORD, byte_alphabet, train_clip_tokenizer

CAPTIONS = [
    "a red circle",
    "a small green star above a purple circle",
    "a blue square left of a yellow triangle and a large orange star below a red circle",
    "a large blue triangle right of a small red square",
    "a yellow star",
]
WORDS = sorted({word for caption in CAPTIONS for word in caption.split()})
COLOURS = {"red": (230, 25, 25), "green": (30, 170, 40), "blue": (30, 60, 230), "yellow": (245, 210, 0)}

TINY = TinyClipConfig(
    vocab_size=600,
    max_length=24,
    text_width=32,
    text_layers=1,
    text_heads=2,
    text_mlp_width=64,
    image_size=16,
    patch_size=8,
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    vision_mlp_width=64,
    projection_dim=16,
    steps=3,
    batch_size=4,
    warmup_steps=1,
    retrieval_pairs=4,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never touch the network. huggingface_hub reads HF_HUB_OFFLINE at import, so set its constant too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny CLIPModel + its trained tokenizer, saved like OpenAI's CLIP."""
    out = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = train_clip_tokenizer(CAPTIONS * 2, out, TINY.vocab_size, TINY.max_length)
    torch.manual_seed(0)
    CLIPModel(build_clip_config(TINY, tokenizer)).save_pretrained(out)
    return out


def write_imagefolder(folder: Path, captions: list[str], size: int) -> None:
    """Solid-colour PNGs (the caption's first colour word) + metadata.jsonl."""
    folder.mkdir(parents=True)
    rows = []
    for i, caption in enumerate(captions):
        colour = next(COLOURS[w] for w in caption.split() if w in COLOURS)
        Image.new("RGB", (size, size), colour).save(folder / f"{i:03d}.png")
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_learns_whole_words(tmp_path):
    train_clip_tokenizer(CAPTIONS * 2, tmp_path, vocab_size=1024, model_max_length=32)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)

    assert tokenizer.model_max_length == 32
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    for caption in CAPTIONS:
        ids = tokenizer(caption).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    for word in WORDS:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids) == [word + END_OF_WORD]
    # CLIP normalisation: lowercase and whitespace cleanup.
    assert tokenizer("A  Red\tCircle").input_ids == tokenizer("a red circle").input_ids


def test_tokenizer_falls_back_to_bytes_for_unseen_words(tmp_path):
    tokenizer = train_clip_tokenizer(CAPTIONS, tmp_path)
    vocab = tokenizer.get_vocab()
    assert all(b in vocab and b + END_OF_WORD in vocab for b in byte_alphabet())
    for text in ["zebra", "ünïcödé", "🦓", "a zebra 🦓 ünïcödé circle"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_tokenizer_stops_at_vocab_size_and_at_rare_pairs(tmp_path):
    base = 2 * 256 + 2  # bytes, bytes ending a word, two special tokens
    assert len(train_clip_tokenizer(CAPTIONS, tmp_path / "capped", vocab_size=base + 5)) == base + 5
    # Every pair of a caption seen once occurs once: nothing is merged.
    assert len(train_clip_tokenizer(["xyz"], tmp_path / "rare", vocab_size=1024)) == base


# --- text encoder ----------------------------------------------------------------------------


def test_text_encoder_from_clip_dir_matches_in_memory_model(clip_dir):
    encoder = TextEncoder.from_pretrained(clip_dir)
    reference = CLIPModel.from_pretrained(clip_dir).eval()
    prompts = CAPTIONS[:3] + [""]

    states, mask = encoder.encode(prompts)
    input_ids, attention_mask = encoder.tokenize(prompts)
    with torch.no_grad():
        expected = reference.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    assert states.shape == (4, TINY.max_length, TINY.text_width)  # (B, T, D)
    assert states.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(states, expected)
    assert encoder.hidden_size == TINY.text_width and encoder.max_length == TINY.max_length
    # The mask covers <|startoftext|>, one token per word, <|endoftext|>; then padding.
    assert mask.sum(dim=1).tolist() == [len(p.split()) + 2 for p in prompts]
    assert mask[3].tolist() == [True, True] + [False] * (TINY.max_length - 2)  # "" = null condition
    assert input_ids[3, 1:].eq(encoder.tokenizer.eos_token_id).all()  # padded with <|endoftext|>


def test_input_embeddings_put_each_tokens_embedding_beside_its_last_state(clip_dir):
    prompts = ["a red circle left of a blue square", "a red circle right of a blue square"]
    plain, mask = TextEncoder.from_pretrained(clip_dir).encode(prompts)
    encoder = TextEncoder.from_pretrained(clip_dir, input_embeddings=True)
    states, same_mask = encoder.encode(prompts)
    input_ids, attention_mask = encoder.tokenize(prompts)
    with torch.no_grad():
        embedded = encoder.model.embeddings(input_ids=input_ids)  # (B, T, D): word + position
    d = TINY.text_width
    assert encoder.width == 2 * d and states.shape == (2, TINY.max_length, 2 * d)
    assert torch.equal(states[..., :d], plain) and torch.equal(same_mask, mask)
    torch.testing.assert_close(states[..., d:], embedded)
    # Only the relation word differs between the prompts, so its embedding is the only one that does.
    differs = (states[0, :, d:] - states[1, :, d:]).abs().amax(dim=-1) > 0  # (T,)
    assert differs.nonzero().flatten().tolist() == [4]  # <start> a red circle [left|right]


def test_text_encoder_from_text_model_dir_is_identical(clip_dir, tmp_path):
    encoder = TextEncoder.from_pretrained(clip_dir)
    encoder.model.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    reloaded = TextEncoder.from_pretrained(tmp_path)

    assert torch.equal(reloaded.encode(CAPTIONS)[0], encoder.encode(CAPTIONS)[0])


def test_text_encoder_is_frozen(clip_dir):
    encoder = TextEncoder.from_pretrained(clip_dir)
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    states, _ = encoder.encode(["a red circle"])
    assert not states.requires_grad


def test_token_strings_lists_kept_tokens(clip_dir):
    encoder = TextEncoder.from_pretrained(clip_dir)
    assert encoder.token_strings("a red circle") == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert encoder.token_strings("") == ["<|startoftext|>", "<|endoftext|>"]


def test_truncation_warns_with_the_dropped_words(clip_dir):
    encoder = TextEncoder.from_pretrained(clip_dir)
    kept = " ".join(["a red circle"] * 7)  # 21 words: fills the 22 slots between start and end with 1 to spare
    prompt = kept + " above a purple square"

    with pytest.warns(UserWarning, match="dropped words: 'a purple square'") as record:
        input_ids, _ = encoder.tokenize([prompt, "a red circle"])
    assert len(record) == 1 and prompt in str(record[0].message)
    assert input_ids.shape == (2, TINY.max_length)
    assert encoder.tokenizer.decode(input_ids[0], skip_special_tokens=True) == kept + " above"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.tokenize(CAPTIONS)  # short prompts: no warning


def test_local_dir_without_tokenizer_files_is_refused(clip_dir, tmp_path):
    for f in clip_dir.iterdir():
        if f.name not in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(TextEncoderLoadError, match="no CLIP tokenizer files.*vocab.json and merges.txt"):
        TextEncoder.from_pretrained(tmp_path)


def test_wrapping_a_tower_keeps_its_gradients_and_loading_freezes_it(clip_dir):
    loaded = TextEncoder.from_pretrained(clip_dir)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    loaded.model.requires_grad_(True)  # what training does to tune it
    wrapped = TextEncoder(loaded.tokenizer, loaded.model)
    assert all(p.requires_grad for p in wrapped.model.parameters())


def test_a_too_long_prompt_gets_our_warning_only(clip_dir, capfd):
    from diffusion.text.prompt_tokens import prompt_tokens

    encoder = TextEncoder.from_pretrained(clip_dir)
    prompt = " ".join(["a red circle"] * 7) + " above a purple square"
    tokens = prompt_tokens(encoder.tokenizer, prompt, encoder.max_length)
    with pytest.warns(UserWarning, match="dropped words: 'a purple square'"):
        encoder.tokenize([prompt])
    assert tokens.dropped_words == "a purple square"  # the same rule as the warning's
    assert "indexing errors" not in capfd.readouterr().err


def test_missing_hub_id_offline_says_how_to_fix():
    with pytest.raises(TextEncoderLoadError) as error:
        TextEncoder.from_pretrained("nonexistent-org/no-such-clip")
    message = str(error.value)
    assert "nonexistent-org/no-such-clip" in message
    assert "Hugging Face Hub" in message and "offline" in message
    assert "local directory" in message and "tiny-clip" in message


def test_broken_local_dir_raises_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TextEncoderLoadError, match="local directory"):
        TextEncoder.from_pretrained(tmp_path)


# --- tiny CLIP training ----------------------------------------------------------------------


def test_train_tiny_clip_saves_a_loadable_clip(tmp_path):
    write_imagefolder(tmp_path / "data" / "train", CAPTIONS * 2, TINY.image_size)
    write_imagefolder(tmp_path / "data" / "test", CAPTIONS, TINY.image_size)
    out = tmp_path / "clip"

    metrics = train_tiny_clip(tmp_path / "data" / "train", out, TINY, test_dir=tmp_path / "data" / "test", progress=False)

    assert metrics["steps"] == TINY.steps and metrics["final_loss"] > 0
    assert metrics["retrieval"]["n_pairs"] == TINY.retrieval_pairs
    assert 0.0 <= metrics["retrieval"]["top1"] <= metrics["retrieval"]["top5"] <= 1.0
    info = json.loads((out / "tiny_clip_info.json").read_text())
    assert info["config"]["text_width"] == TINY.text_width
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip", "data"]  # no staging folder left behind

    encoder = TextEncoder.from_pretrained(out)
    states, mask = encoder.encode(["a red circle", ""])
    assert states.shape == (2, TINY.max_length, TINY.text_width)
    assert torch.isfinite(states).all()
    assert retrieval_accuracy(out, tmp_path / "data" / "test", n_pairs=4) == metrics["retrieval"]


def test_tuned_text_states_start_as_the_frozen_cache_and_carry_gradients(clip_dir):
    encoder = TextEncoder.from_pretrained(clip_dir)
    captions = ["a red circle", "a blue star left of a green square", "a red circle"]
    frozen = TextStateCache(encoder, captions, progress=False)
    tuned = TunedTextStates(encoder, captions, encoder.model.requires_grad_(True))
    assert tuned.distinct == frozen.distinct == ["", "a red circle", "a blue star left of a green square"]
    rows = frozen.rows(["a blue star left of a green square", ""])
    (states, mask), (cached, cached_mask) = tuned.lookup(rows), frozen.lookup(rows)
    assert torch.equal(mask, cached_mask) and torch.allclose(states, cached, atol=1e-5)
    states[mask].sum().backward()  # the states reach back to the token embeddings of the words in the batch
    embedding_grad = encoder.model.get_input_embeddings().weight.grad  # (vocab, D)
    star = encoder.tokenizer.convert_tokens_to_ids("star</w>")
    circle = encoder.tokenizer.convert_tokens_to_ids("circle</w>")
    assert embedding_grad[star].abs().sum() > 0 and embedding_grad[circle].abs().sum() == 0


def test_two_captions_of_one_image_are_matches_not_negatives():
    # Pairs: image 0 with captions A and B (one row, two captions), image 1 with caption C.
    caption_ids, row_ids = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    logits = torch.zeros(3, 3, requires_grad=True)  # text i against image j
    contrastive_loss(logits, caption_ids, row_ids).backward()
    # Raising caption B's score for image 0 (its own row's image, paired with caption A) lowers the loss;
    # raising it for image 1 (another row) raises it.
    assert logits.grad[1, 0] < 0 < logits.grad[1, 2]
    # With distinct rows the same captions are plain CLIP: caption B's only match is its own image.
    logits.grad = None
    contrastive_loss(logits, caption_ids, torch.tensor([0, 1, 2])).backward()
    assert logits.grad[1, 0] > 0 and logits.grad[1, 1] < 0
