"""The model card in every export (front matter the Hub reads, numbers from the run's own record), the
evaluation's table written into it, and a model loaded back by its Hub id from the Hugging Face cache."""

import json
import os
import shutil
import subprocess
import sys

from diffusion.card import CARD_FILE, EVALUATION_END, EVALUATION_START, split_card, write_evaluation
from diffusion.runs import run_name

from conftest import ROOT


def test_every_export_carries_a_card_with_the_runs_numbers(finished_run):
    model = finished_run / "model"
    header, body = split_card((model / CARD_FILE).read_text())
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "text-to-image"
    assert "crossattn-diffusion" in header["tags"] and "license" not in header  # the shapes carry no licence
    info = json.loads((model / "training_info.json").read_text())
    assert f"{info['step']:,} of batch 16 in {info['minutes']:.1f} minutes" in body
    assert f"the built-in shapes ({info['images']:,} images" in body and info["images"] == 512
    assert f"{info['unet_parameters'] / 1e6:.2f}M parameters with its text placer" in body
    assert f"{info['device']}, {info['mixed_precision']}, 1 process(es)" in body
    assert (model / "validation.png").is_file() and info["validation_step"] == 40
    assert "![the validation prompts at step 40, seed 0](validation.png)" in body
    assert body.count(EVALUATION_START) == 1 and body.count(EVALUATION_END) == 1


def test_the_evaluation_replaces_only_its_section(finished_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(finished_run / "model", model)
    original = (model / CARD_FILE).read_text()
    write_evaluation(model, "| task | score |\n| --- | --- |\n| overall | 0.5 |")
    write_evaluation(model, "| task | score |\n| --- | --- |\n| overall | 0.9 |")
    card = (model / CARD_FILE).read_text()
    assert "| overall | 0.9 |" in card and "0.5" not in card.split(EVALUATION_START)[1]
    assert card.split(EVALUATION_START)[0] == original.split(EVALUATION_START)[0]
    assert card.split(EVALUATION_END)[1] == original.split(EVALUATION_END)[1]
    # A card written by hand keeps every word; the section goes at its end.
    (model / CARD_FILE).write_text("# My model\n\nMy own words.\n")
    write_evaluation(model, "| overall | 0.7 |")
    mine = (model / CARD_FILE).read_text()
    assert mine.startswith("# My model\n\nMy own words.\n") and "| overall | 0.7 |" in mine


def hub_cache(tmp_path, finished_run, repo="someone/tiny-shapes"):
    """The Hugging Face cache as `hf download someone/tiny-shapes` leaves it (a snapshot and refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(finished_run / "model", repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return tmp_path / "hub", repo_dir / "snapshots" / commit


def test_a_model_loads_back_by_its_hub_id_from_the_cache(finished_run, tmp_path):
    cache, snapshot = hub_cache(tmp_path, finished_run)
    # No network in tests: offline, huggingface_hub reads the cached copy, as it does for any user offline.
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--device", "cpu", "--no-progress", "--model", "someone/tiny-shapes",
         "--prompt", "a red circle", "--steps", "2", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "a-red-circle_seed0.attn" / "manifest.json").read_text())
    assert manifest["model"] == str(snapshot.resolve())
    assert run_name(snapshot) == "tiny-shapes"
    missing = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--model", "someone/other", "--prompt", "a red circle"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "someone/other: cannot download it from the Hugging Face Hub and the cache holds no copy" in missing.stderr
