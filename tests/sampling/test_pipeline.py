"""Sampling from a trained tiny run: the pipeline, the CLI, and the attention maps saved beside images."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.sampling.settings import SamplerSettings
from diffusion.maps.aggregate import MapSettings
from diffusion.sampling.generate import parse_seeds
from diffusion.maps.export import slug
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.text.prompt_tokens import PromptTokens, prompt_tokens
from diffusion.sampling.schedulers import SCHEDULERS

from conftest import ROOT


@pytest.fixture(scope="module")
def pipe(finished_run):
    return TextToImagePipeline.from_run(finished_run)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def run_cli(*args):
    return subprocess.run([sys.executable, "sample.py", "--device", "cpu", "--no-progress", *args], cwd=ROOT, capture_output=True, text=True)


def test_same_seed_same_image_alone_or_in_a_batch(pipe):
    a = pipe(["a red circle"], [3], settings=SamplerSettings(steps=4)).images[0]
    b = pipe(["a red circle"], [3], settings=SamplerSettings(steps=4)).images[0]
    batch = pipe(["a blue square", "a red circle"], [0, 3], settings=SamplerSettings(steps=4)).images
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(batch[1])).max() <= 1
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


def test_recording_maps_does_not_change_the_image(pipe):
    plain = pipe(["a green star"], [1], settings=SamplerSettings(steps=4)).images[0]
    recorded = pipe(["a green star"], [1], settings=SamplerSettings(steps=4), return_attention=True).images[0]
    assert np.abs(pixels(plain) - pixels(recorded)).max() <= 1


def test_every_image_of_a_batch_gets_its_own_maps(pipe):
    prompts = ["a red circle", "a blue square left of a green star"]
    out = pipe(prompts, [0, 1], settings=SamplerSettings(steps=4), return_attention=True)
    alone = pipe(prompts[1:], [1], settings=SamplerSettings(steps=4), return_attention=True).attention[0]
    first, second = out.attention
    assert first.tokens.words == ["a", "red", "circle"]
    assert second.tokens.words == ["a", "blue", "square", "left", "of", "a", "green", "star"]
    torch.testing.assert_close(second.global_map, alone.global_map, atol=1e-4, rtol=1e-4)
    assert first.global_map.shape[0] == len(first.tokens.tokens) != second.global_map.shape[0]


def test_maps_are_distributions_over_tokens(pipe):
    attention = pipe(["a small yellow star"], [0], settings=SamplerSettings(steps=3), return_attention=True).attention[0]
    size = pipe.unet.config.sample_size
    assert attention.global_map.shape == (len(attention.tokens.tokens), size, size)
    # Each step's probabilities sum to one over tokens; means and bilinear upsampling keep that.
    torch.testing.assert_close(attention.global_map.sum(0), torch.ones(size, size), atol=1e-4, rtol=1e-4)
    assert set(attention.layers) == set(pipe.unet.cross_attention_layers)
    for maps in attention.layers.values():
        torch.testing.assert_close(maps.sum(0), torch.ones(size, size), atol=1e-4, rtol=1e-4)


def test_multi_token_words_get_the_mean_of_their_tokens(pipe):
    attention = pipe(["a zebra circle"], [0], settings=SamplerSettings(steps=2), return_attention=True).attention[0]
    tokens = attention.tokens
    zebra = tokens.words.index("zebra")
    pieces = tokens.token_indices(zebra)
    assert len(pieces) > 1  # an unseen word falls back to several sub-word tokens
    torch.testing.assert_close(attention.word_maps()[zebra], attention.global_map[pieces].mean(0))


def test_snapshots_and_timestep_window(pipe):
    snapshots = MapSettings(snapshot_every=2)
    attention = pipe(["a red circle"], [0], settings=SamplerSettings(steps=6), return_attention=True, map_settings=snapshots).attention[0]
    assert sorted(attention.snapshots) == [1, 3, 5]
    torch.testing.assert_close(attention.snapshots[5], attention.global_map)  # the last snapshot is the whole mean
    window = MapSettings(timestep_range=(0, 600))
    attention = pipe(["a red circle"], [0], settings=SamplerSettings(steps=6), return_attention=True, map_settings=window).attention[0]
    assert attention.steps_aggregated and all(t <= 600 for t in attention.steps_aggregated)
    assert len(attention.steps_aggregated) < 6


def test_cli_writes_images_maps_and_manifest(finished_run, tmp_path):
    out = tmp_path / "samples"
    result = run_cli("--model", str(finished_run), "--prompt", "a red circle", "--prompt",
                     "a blue square left of a green star", "--seeds", "0-2", "--batch-size", "4",
                     "--steps", "3", "--out", str(out), "--maps-every", "1")
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6 and "a-red-circle_seed2.png" in pngs
    folder = out / "a-blue-square-left-of-a-green-star_seed1.attn"
    manifest = json.loads((folder / "manifest.json").read_text())
    arrays = np.load(folder / "maps.npz")
    n_tokens, n_words = len(manifest["tokens"]), len(manifest["words"])
    assert arrays["global"].shape == (n_tokens, 16, 16) and arrays["words"].shape == (n_words, 16, 16)
    assert {f"layer/{name}" for name in manifest["layers"]} <= set(arrays.files)
    assert {f"step/{i}" for i in manifest["snapshot_steps"]} <= set(arrays.files) and manifest["snapshot_steps"]
    assert sorted(p.name for p in (folder / "words").iterdir()) == manifest["word_files"]
    # Beside each map snapshot, the denoised estimate of the image after that step; the last is the image.
    assert len(manifest["snapshot_images"]) == len(manifest["snapshot_steps"]) == 3
    last = Image.open(folder / manifest["snapshot_images"][-1])
    assert np.array_equal(np.asarray(last), np.asarray(Image.open(out / "a-blue-square-left-of-a-green-star_seed1.png")))
    assert (folder / "grid.png").is_file()
    assert manifest["seed"] == 1 and manifest["steps"] == 3
    assert manifest["scheduler"] == SamplerSettings().scheduler and manifest["guidance_scale"] == SamplerSettings().guidance
    assert manifest["tokens"][manifest["start_token"]] == "<|startoftext|>"
    assert manifest["tokens"][manifest["end_token"]] == "<|endoftext|>"
    # The manifest round-trips into the token -> word key it was written from.
    pipe = TextToImagePipeline.from_run(finished_run)
    expected = prompt_tokens(pipe.tokenizer, manifest["prompt"], pipe.encoder.max_length)
    rebuilt = PromptTokens(
        prompt=manifest["prompt"], tokens=manifest["tokens"], word_of_token=manifest["word_of_token"],
        words=manifest["words"], start_token=manifest["start_token"], end_token=manifest["end_token"],
        num_padding=manifest["num_padding_tokens"], dropped_words=manifest["dropped_words"],
    )
    assert rebuilt == expected


def test_cli_never_overwrites_without_asking(finished_run, tmp_path):
    args = ("--model", str(finished_run), "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path), "--no-maps")
    assert run_cli(*args).returncode == 0
    before = (tmp_path / "a-red-circle_seed0.png").read_bytes()
    again = run_cli(*args)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (tmp_path / "a-red-circle_seed0.png").read_bytes() == before
    # --out naming a file (the image itself, say) is refused, the file left as it was.
    file_out = run_cli("--model", str(finished_run), "--prompt", "a red circle", "--out", str(tmp_path / "a-red-circle_seed0.png"))
    assert file_out.returncode == 2 and "is a file; --out names the folder" in file_out.stderr and "Traceback" not in file_out.stderr
    assert (tmp_path / "a-red-circle_seed0.png").read_bytes() == before
    assert run_cli(*args, "--overwrite").returncode == 0


def test_empty_and_long_prompts(finished_run, tmp_path):
    long_prompt = " ".join(["a red circle left of a blue square"] * 4)
    result = run_cli("--model", str(finished_run), "--prompt", "", "--prompt", long_prompt, "--steps", "2",
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "unconditional" in result.stderr and "dropped words" in result.stderr
    assert (tmp_path / "unconditional_seed0.png").is_file()
    assert not (tmp_path / "unconditional_seed0.attn").exists()
    manifest = json.loads((tmp_path / f"{slug(long_prompt)}_seed0.attn" / "manifest.json").read_text())
    assert manifest["dropped_words"] and len(manifest["tokens"]) == 24  # the tiny CLIP's limit
    assert manifest["num_padding_tokens"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scheduler", "plms"], "unknown --scheduler 'plms'; choose one of: ddim, dpm++, euler, ddpm"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--guidance", "-1"], "--guidance must be >= 0"),
        (["--layout-guidance", "-1"], "--layout-guidance must be >= 0"),
        (["--seeds", "x-y"], "write seeds as"),
    ],
)
def test_cli_bad_flags(finished_run, args, message):
    result = run_cli("--model", str(finished_run), "--prompt", "a red circle", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_cli_bad_model_folder(tmp_path):
    result = run_cli("--model", str(tmp_path), "--prompt", "a red circle")
    assert result.returncode == 2
    assert "not a run folder or an exported model" in result.stderr and "Traceback" not in result.stderr


def test_every_scheduler_samples(pipe):
    images = {}
    for name in ("ddim", "dpm++", "euler", "ddpm"):
        images[name] = pixels(pipe(["a red circle"], [0], settings=SamplerSettings(scheduler=name, steps=3)).images[0])
        assert images[name].shape == (16, 16, 3)
    assert not np.array_equal(images["ddim"], images["ddpm"])  # the settings' scheduler is the one used


def test_sampler_settings_check_themselves_and_reach_the_manifest(pipe, finished_run, tmp_path):
    with pytest.raises(ValueError, match="--steps must be at least 1"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="unknown --scheduler 'plms'"):
        SamplerSettings(scheduler="plms")
    out = tmp_path / "samples"
    result = run_cli("--model", str(finished_run), "--prompt", "a red circle", "--steps", "2", "--guidance", "2",
                     "--scheduler", "ddim", "--layout-guidance", "1.5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads(next(out.glob("*.attn/manifest.json")).read_text())
    assert {k: manifest[k] for k in ("scheduler", "steps", "guidance_scale", "layout_guidance")} == SamplerSettings(
        scheduler="ddim", steps=2, guidance=2.0, layout_guidance=1.5
    ).manifest()


def test_seed_ranges():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5,9-10") == [1, 5, 9, 10]
    assert slug("A red/circle!" * 20).count("/") == 0 and len(slug("x" * 500)) <= 60


def test_export_is_a_diffusers_pipeline(finished_run, tmp_path):
    loaded = TextToImagePipeline.from_pretrained(finished_run / "model")
    # The export carries the default sampler, on the training noise schedule.
    assert type(loaded.scheduler) is SCHEDULERS[SamplerSettings().scheduler]
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    loaded.save_pretrained(tmp_path / "copy")
    again = TextToImagePipeline.from_pretrained(tmp_path / "copy")
    a = loaded(["a red circle"], [0], settings=SamplerSettings(steps=3)).images[0]
    b = again(["a red circle"], [0], settings=SamplerSettings(steps=3)).images[0]
    assert np.array_equal(pixels(a), pixels(b))


def copied_export(finished_run, tmp_path):
    import shutil

    return shutil.copytree(finished_run / "model", tmp_path / "old-model")


def test_a_model_exported_before_the_sub_packages_is_refused_naming_the_fix(finished_run, tmp_path):
    from diffusion.runs import ModelLoadError

    old = copied_export(finished_run, tmp_path)
    index = json.loads((old / "model_index.json").read_text())
    assert index["unet"] == ["diffusion.model.unet", "UNet"]  # what an export names today
    (old / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusion.unet", "UNet"]}))  # and then
    with pytest.raises(ModelLoadError, match=re.escape(f"{old} was exported before the package had sub-packages") + ".*re-make it by training"):
        TextToImagePipeline.from_run(old)  # a UserError: the commands print it in one line (test_cli_bad_model_folder)


def test_the_sampling_loop_reads_only_its_timesteps_and_results_cross_to_the_host_once(pipe):
    """On a GPU each read of a tensor into Python waits for the device (tests/host_reads.py). The loop (the UNet,
    guidance, layout guidance's gradient steps, map recording, snapshots) reads its timesteps once; what the caller
    gets (images, maps, snapshots) crosses to the host in devices.to_host and nowhere else."""
    from host_reads import HostReads

    settings = SamplerSettings(steps=6, layout_guidance=0.05)
    with HostReads() as seen:
        out = pipe(["a red circle left of a blue square", "a green star"], [0, 1], settings, return_attention=True,
                   map_settings=MapSettings(snapshot_every=2))
    in_loop = [(what, where) for what, _, where, within in seen.reads if "loop.py:sample" in within]
    assert len(in_loop) == 1 and in_loop[0][0] == "tolist" and in_loop[0][1].startswith("diffusion/sampling/loop.py")
    copies = {function for what, function, _, _ in seen.reads if what == "cpu"}
    assert copies == {"to_host"}
    assert len(out.attention[1].snapshots) == 3 and out.images[1].size == (16, 16)
