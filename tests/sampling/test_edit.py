"""Prompt-to-prompt on the tiny run: the edit takes its source's maps as asked, shares its noise and
layout, re-weights words, writes its pair from the CLI, and every bad input gets its message."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion.maps.aggregate import MapSettings
from diffusion.sampling.edit import PromptToPrompt, align
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.settings import EditSettings, EditSettingsError, SamplerSettings
from diffusion.text.prompt_tokens import prompt_tokens

from conftest import ROOT

STEPS = SamplerSettings(steps=4)
EVERY_STEP = MapSettings(snapshot_every=1)


@pytest.fixture(scope="module")
def pipe(finished_run):
    return TextToImagePipeline.from_run(finished_run)


def tokens(pipe, prompt):
    return prompt_tokens(pipe.tokenizer, prompt, pipe.encoder.max_length)


def test_words_align_by_their_longest_matching_runs(pipe):
    source = tokens(pipe, "a red circle left of a blue square")
    swapped = align(source, tokens(pipe, "a red star left of a blue square"), pipe.encoder.max_length)
    assert swapped.described[2] == "star <- circle" and len(swapped.source_word) == 8
    added = align(tokens(pipe, "a red circle"), tokens(pipe, "a small red circle"), pipe.encoder.max_length)
    assert added.described == ["a <- a", "small (new)", "red <- red", "circle <- circle"]
    edited = tokens(pipe, "a small red circle")
    assert not added.aligned[edited.token_indices(1)].any() and added.aligned[edited.end_token]
    # A word the tokenizer splits takes the mean of the word it replaces (rows still sum to one).
    split = tokens(pipe, "a red zzqxv")
    unusual = align(tokens(pipe, "a red circle"), split, pipe.encoder.max_length)
    rows = unusual.matrix[split.token_indices(2)]
    assert len(split.token_indices(2)) > 1 and torch.allclose(rows.sum(1), torch.ones(len(rows)))


def test_the_same_seed_gives_both_branches_the_same_noise(pipe):
    """Identical prompts with nothing injected: DDPM draws fresh noise at every step, so only the same
    initial and per-step noise (and the same layout) in both branches gives the same image."""
    plain = EditSettings(cross_replace=0.0, self_replace=0.0)
    out = pipe.edit(["a red circle left of a blue square"], ["a red circle left of a blue square"], [5], plain, STEPS)
    assert np.array_equal(np.asarray(out.source.images[0]), np.asarray(out.edited.images[0]))
    alone = pipe(["a red circle left of a blue square"], [5], STEPS).images[0]
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(out.source.images[0], dtype=int)).max() <= 1


def test_replace_at_every_step_gives_the_edit_the_sources_maps(pipe):
    out = pipe.edit(["a red circle"], ["a red star"], [1], EditSettings(cross_replace=1.0, self_replace=0.0), STEPS,
                    return_attention=True, map_settings=EVERY_STEP)
    source, edited = out.source.attention[0], out.edited.attention[0]
    assert sorted(edited.snapshots) == list(range(STEPS.steps))
    for step in edited.snapshots:  # the running mean equal at every step: each step's maps are equal
        assert torch.equal(edited.snapshots[step], source.snapshots[step])
    for name in source.layers:
        assert torch.equal(edited.layers[name], source.layers[name])
    # Not injected, the edit's own maps differ.
    free = pipe.edit(["a red circle"], ["a red star"], [1], EditSettings(cross_replace=0.0, self_replace=0.0), STEPS,
                     return_attention=True)
    assert not torch.equal(free.edited.attention[0].global_map, free.source.attention[0].global_map)


def test_injection_stops_after_its_fraction_and_per_word(pipe):
    half = EditSettings(cross_replace=0.5, self_replace=0.0, cross_replace_words=(("star", 1.0),))
    out = pipe.edit(["a red circle"], ["a red star"], [1], half, STEPS, return_attention=True, map_settings=EVERY_STEP)
    source, edited = out.source.attention[0], out.edited.attention[0]
    star = edited.tokens.token_indices(2)
    for step in range(STEPS.steps):
        assert torch.equal(edited.snapshots[step][star], source.snapshots[step][star])  # star: every step
    assert torch.equal(edited.snapshots[1], source.snapshots[1])  # all words: the first half
    assert not torch.equal(edited.snapshots[3], source.snapshots[3])


def test_refine_injects_the_shared_words_and_leaves_the_new_one_free(pipe):
    out = pipe.edit(["a red circle"], ["a small red circle"], [2], EditSettings(cross_replace=1.0, self_replace=0.0), STEPS,
                    return_attention=True)
    source, edited = out.source.attention[0], out.edited.attention[0]
    for s, e in ((1, 2), (2, 3)):  # red, circle
        assert torch.equal(edited.global_map[edited.tokens.token_indices(e)], source.global_map[source.tokens.token_indices(s)])
    assert torch.equal(edited.global_map[edited.tokens.end_token], source.global_map[source.tokens.end_token])


def test_reweight_scales_one_words_attention(pipe):
    prompts = ["a red circle left of a blue square"]
    weights = {}
    for weight in (0.0, 1.0, 2.0):
        out = pipe.edit(prompts, prompts, [3], EditSettings(cross_replace=1.0, self_replace=0.0, reweight=(("red", weight),)),
                        STEPS, return_attention=True)
        weights[weight] = out
    source = weights[1.0].source.attention[0]
    red = source.tokens.token_indices(1)
    assert weights[0.0].edited.attention[0].global_map[red].abs().max() == 0
    torch.testing.assert_close(weights[2.0].edited.attention[0].global_map[red], 2 * source.global_map[red])
    torch.testing.assert_close(weights[1.0].edited.attention[0].global_map, source.global_map)


def test_the_edit_follows_its_sources_placer_centres(pipe):
    source, edited = tokens(pipe, "a red circle left of a blue square"), tokens(pipe, "a small red star left of a blue square")
    control = PromptToPrompt([source], [edited], EditSettings(), 4, pipe.encoder.max_length)
    centres = torch.randn(2, pipe.encoder.max_length, 3, 2)
    followed = control.follow_centres(centres)
    assert torch.equal(followed[0], centres[0])
    for e, s in ((3, 2), (2, 1), (8, 7)):  # star <- circle, red <- red, square <- square
        assert torch.equal(followed[1, edited.token_indices(e)], centres[0, source.token_indices(s)])
    assert torch.equal(followed[1, edited.token_indices(1)], centres[1, edited.token_indices(1)])  # small: its own


def run_cli(*args):
    return subprocess.run([sys.executable, "sample.py", "--device", "cpu", "--no-progress", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_writes_both_images_their_maps_the_pair_and_the_manifest(finished_run, tmp_path):
    out = tmp_path / "edits"
    args = ["--model", str(finished_run), "--prompt", "a red circle", "--edit", "a red star", "--steps", "3",
            "--cross-replace", "0.6", "--cross-replace", "star=1", "--reweight", "red=2", "--out", str(out)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    source, edited = out / "a-red-circle_to_a-red-star_seed0.png", out / "a-red-circle_to_a-red-star_seed0_edited.png"
    assert source.is_file() and edited.is_file() and (out / "pairs" / source.name).is_file()
    assert not (out / "a-red-circle_seed0.png").exists()  # the prompt's own samples keep their names free
    manifest = json.loads((edited.with_suffix(".attn") / "manifest.json").read_text())
    assert manifest["edit"] == {
        "role": "edited", "source_image": source.name, "source_prompt": "a red circle",
        "alignment": ["a <- a", "red <- red", "star <- circle"], "cross_replace": 0.6, "self_replace": 0.4,
        "cross_replace_words": {"star": 1.0}, "reweight": {"red": 2.0},
    }
    recorded = json.loads((source.with_suffix(".attn") / "manifest.json").read_text())
    assert recorded["edit"]["edited_image"] == edited.name
    again = run_cli(*args)
    assert again.returncode == 2 and "already exist" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--edit", "a red star", "--cross-replace", "1.5"], "--cross-replace 1.5: a fraction of the sampling steps must lie in [0, 1]"),
        (["--edit", "a red star", "--self-replace", "-0.1"], "--self-replace -0.1: a fraction"),
        (["--reweight", "blue=2"], "--reweight blue=2: the prompt 'a red circle' has no word 'blue'"),
        (["--reweight", "red"], "--reweight 'red': write WORD=NUMBER"),
        (["--reweight", "red=-1"], "--reweight red=-1: a word's weight must be >= 0"),
        (["--edit", "a small red circle", "--cross-replace", "small=0.5"], "'small' is new in 'a small red circle'"),
        (["--edit", "a red star", "--edit", "a red square"], "give one --edit per --prompt"),
        (["--cross-replace", "0.5"], "--cross-replace and --self-replace shape an edit: add --edit"),
        (["--edit", ""], "an edit needs words on both sides"),
        (["--head-maps", "--no-maps"], "--head-maps saves each layer's maps per head"),
    ],
)
def test_cli_bad_edit_flags(finished_run, tmp_path, args, message):
    result = run_cli("--model", str(finished_run), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path / "x"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_edit_settings_check_themselves():
    with pytest.raises(EditSettingsError, match="--cross-replace star=2: a fraction"):
        EditSettings(cross_replace_words=(("star", 2.0),))
    assert EditSettings().manifest()["cross_replace"] == EditSettings().cross_replace


def test_head_maps_average_to_the_saved_head_mean(finished_run, tmp_path):
    out = tmp_path / "heads"
    result = run_cli("--model", str(finished_run), "--prompt", "a red circle left of a blue square", "--steps", "2",
                     "--head-maps", "--out", str(out))
    assert result.returncode == 0, result.stderr
    attn = out / "a-red-circle-left-of-a-blue-square_seed0.attn"
    manifest = json.loads((attn / "manifest.json").read_text())
    arrays = np.load(attn / "maps.npz")
    assert manifest["heads_saved"] and set(manifest["heads_saved"]) == set(manifest["layers_saved"])
    assert max(manifest["heads_saved"].values()) > 1
    for name, heads in manifest["heads_saved"].items():
        per_head = np.stack([arrays[f"layer/{name}/head{k}"] for k in range(heads)])
        assert heads == 1 or not np.allclose(per_head[0], per_head[1])
        np.testing.assert_allclose(per_head.mean(0), arrays[f"layer/{name}"], atol=1e-6)
