"""A CLIP-style byte-pair-encoding tokenizer learned from the dataset's captions.

The vocabulary follows OpenAI's CLIP layout, so `transformers.CLIPTokenizer.from_pretrained` reads it:

    256 byte symbols | the same 256 with `</w>` | learned merges | <|startoftext|> <|endoftext|>

Every byte and every byte-ending-a-word is in the vocabulary, so any word (unseen, non-ASCII,
emoji) still tokenizes: it falls back to byte symbols. Merges are learned on the captions' words,
after exactly the normalisation and pre-tokenisation that `CLIPTokenizer` itself applies.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
MIN_PAIR_COUNT = 2

Word = tuple[str, ...]  # a word as a sequence of BPE symbols
Pair = tuple[str, str]


def byte_alphabet() -> list[str]:
    """The 256 printable unicode characters standing for the bytes 0..255 (GPT-2/CLIP `bytes_to_unicode`), in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    # Printable bytes stand for themselves; the others are shifted past 255, in byte order.
    shifted = [256 + i for i in range(256 - len(printable))]
    return [chr(c) for c in printable + shifted]


def caption_words(captions: Iterable[str]) -> Counter[str]:
    """Count the byte-level words of `captions`, split exactly as `CLIPTokenizer` splits text."""
    backend = CLIPTokenizer().backend_tokenizer  # an empty tokenizer: only its normaliser and pre-tokeniser are used
    counts: Counter[str] = Counter()
    for caption in captions:
        normalized = backend.normalizer.normalize_str(caption)
        counts.update(word for word, _span in backend.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def split_into_symbols(word: str) -> Word:
    """'red' -> ('r', 'e', 'd</w>'): one symbol per byte character, the last marked as ending the word."""
    return tuple(word[:-1]) + (word[-1] + END_OF_WORD,)


def count_pairs(words: dict[Word, int]) -> Counter[Pair]:
    pairs: Counter[Pair] = Counter()
    for symbols, count in words.items():
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += count
    return pairs


def apply_merge(symbols: Word, pair: Pair) -> Word:
    """Replace every occurrence of `pair` in `symbols` by the joined symbol, left to right."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def learn_merges(word_counts: Counter[str], max_merges: int) -> list[Pair]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair until `max_merges` or no pair occurs twice."""
    words: dict[Word, int] = {split_into_symbols(w): c for w, c in word_counts.items()}
    merges: list[Pair] = []
    while len(merges) < max_merges:
        pairs = count_pairs(words)
        if not pairs:
            break
        # Most frequent first; ties broken by the pair itself so training is deterministic.
        best, best_count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if best_count < MIN_PAIR_COUNT:
            break
        merges.append(best)
        words = {apply_merge(symbols, best): count for symbols, count in words.items()}
    return merges


def build_vocab(merges: list[Pair]) -> dict[str, int]:
    alphabet = byte_alphabet()
    tokens = alphabet + [b + END_OF_WORD for b in alphabet] + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer_files(out_dir: Path, vocab: dict[str, int], merges: list[Pair], model_max_length: int) -> None:
    """The files OpenAI's CLIP repos ship: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **special_tokens}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2), encoding="utf-8")


def train_clip_tokenizer(
    captions: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1024,
    model_max_length: int = 32,
) -> CLIPTokenizer:
    """Learn BPE merges on `captions`, save CLIP tokenizer files to `out_dir` and load them back."""
    base_size = 2 * len(byte_alphabet()) + 2  # bytes, bytes ending a word, two special tokens
    if vocab_size < base_size:
        raise ValueError(f"vocab_size must be at least {base_size} (the byte alphabet and special tokens), got {vocab_size}")
    merges = learn_merges(caption_words(captions), max_merges=vocab_size - base_size)
    out_dir = Path(out_dir)
    write_tokenizer_files(out_dir, build_vocab(merges), merges, model_max_length)
    return CLIPTokenizer.from_pretrained(out_dir)
