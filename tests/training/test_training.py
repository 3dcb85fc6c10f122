"""Training on the tiny preset: the loop, checkpoints, resume, several processes, and the errors."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion.training.checkpoints import CheckpointError, list_checkpoints
from diffusion.config import ConfigError, load_config
from diffusion.training.objective import Objective
from diffusion.training.loop import train
from diffusion.training.setup import TrainingError, build_unet, resolve_precision

from conftest import ROOT, TINY, exported_weights, tiny_config


def test_run_folder_holds_everything(finished_run):
    run = finished_run
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    log = (run / "train.log").read_text()
    assert re.search(r"step 40 loss \d\.\d+ .* grounding \d\.\d+", log)  # tiny.yaml trains with the grounding loss
    assert re.search(r"mixed precision: (bf16|no) \(train.mixed_precision=auto: this CPU", log)  # the choice is said
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    steps = [step for step, _ in list_checkpoints(run / "checkpoints")]
    assert steps == [20, 40]  # every 20 steps, the last 2 kept
    assert not list((run / "checkpoints").glob(".*"))  # no staging folders left behind
    assert (run / "validation" / "step_000040.png").is_file()  # the grid, and each prompt's image and maps:
    assert (run / "validation" / "step_000040" / "a-red-circle_seed0.attn" / "manifest.json").is_file()
    for part in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer_config.json", "config.yaml"):
        assert (run / "model" / part).is_file(), part
    info = json.loads((run / "model" / "training_info.json").read_text())
    assert info["step"] == 40 and (Path(info["train_dir"]) / "metadata.jsonl").is_file()  # the data it learned from


def test_same_seed_same_training(cache_dir, finished_run, tmp_path):
    again = tmp_path / "again"
    train(tiny_config(cache_dir), output_dir=str(again), progress=False, device="cpu")
    first, second = exported_weights(finished_run), exported_weights(again)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_continues_exactly(finished_run, tmp_path):
    # Pretend the run was killed just after its step-20 checkpoint, then resume it.
    killed = tmp_path / "killed"
    shutil.copytree(finished_run, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-000040")
    shutil.rmtree(killed / "model")
    cfg = load_config(killed / "config.yaml")
    train(cfg, output_dir=str(killed), resume="latest", progress=False, device="cpu")
    uninterrupted, resumed = exported_weights(finished_run), exported_weights(killed)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    # The tuned text tower (and its EMA) continues exactly too.
    tower, resumed_tower = (text_tower_weights(run / "model" / "text_encoder") for run in (finished_run, killed))
    assert all(torch.equal(tower[k], resumed_tower[k]) for k in tower)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(cache_dir):
    cfg = tiny_config(cache_dir)
    torch.manual_seed(0)
    unet = build_unet(cfg, context_dim=8)
    objective = Objective(cfg.train, unet)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    context, mask = torch.randn(8, 5, 8), torch.ones(8, 5, dtype=torch.bool)

    def fixed_loss():
        torch.manual_seed(123)  # the same timesteps and noise every time
        return objective(unet, images, context, mask, grounding=None).diffusion

    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    before = fixed_loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        fixed_loss().backward()
        optimizer.step()
    assert fixed_loss().item() < 0.7 * before


def test_auto_precision_takes_bf16_only_where_the_hardware_computes_it():
    cpu = torch.device("cpu")
    assert resolve_precision("no", cpu) == ("no", "as configured")
    assert resolve_precision("bf16", cpu) == ("bf16", "as configured")  # a forced choice is kept
    chosen, reason = resolve_precision("auto", cpu)
    assert chosen in ("bf16", "no") and torch.backends.cpu.get_cpu_capability() in reason
    assert chosen == "no" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_taken_run_folder_and_missing_checkpoint(cache_dir, finished_run, tmp_path):
    with pytest.raises(TrainingError, match="already holds a run.*--resume latest"):
        train(tiny_config(cache_dir), output_dir=str(finished_run), progress=False, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        train(tiny_config(cache_dir), output_dir=str(empty), resume="latest", progress=False, device="cpu")


def test_bad_attention_resolution_is_a_config_error_before_any_preparation(tmp_path):
    cfg = tiny_config(tmp_path / "cache", "unet.cross_attention_resolutions=[4]")
    with pytest.raises(ConfigError, match=r"asks for \[4\].*choose from \[16, 8\]"):
        train(cfg, output_dir=str(tmp_path / "run"), progress=False, device="cpu")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir, "train.learning_rate=1e30", "train.warmup_steps=0", "train.grad_clip=0.0",
                      "train.checkpoint_every=1", "train.validate_every=0")
    run = tmp_path / "diverged"
    with pytest.raises(TrainingError, match=r"the loss became non-finite \(loss (nan|inf).*\) between steps \d+ and \d+; .* "
                                            r"the last good checkpoint is .*To start again, use another --output-dir"):
        train(cfg, output_dir=str(run), progress=False, device="cpu")
    assert list_checkpoints(run / "checkpoints")
    assert not (run / "model").exists()
    # Diverged before its first checkpoint: the message says how to start again in the same place.
    early = tmp_path / "diverged-early"
    cfg = tiny_config(cache_dir, "train.learning_rate=1e30", "train.warmup_steps=0", "train.grad_clip=0.0",
                      "train.checkpoint_every=100", "train.log_every=2", "train.validate_every=0")
    with pytest.raises(TrainingError, match=f"no checkpoint was written.*To start again, remove {early} or use another --output-dir"):
        train(cfg, output_dir=str(early), progress=False, device="cpu")


def test_cli_reports_user_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(TINY), "train.batch_sise=3"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "unknown key(s) batch_sise" in result.stderr and "Traceback" not in result.stderr


def user_folder(folder, rows):
    folder.mkdir()
    for i, row in enumerate(rows):
        Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / f"{i}.png")
    Image.new("L", (16, 16), 1).save(folder / "mask.png")  # one object covering the image
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", **row}) + "\n" for i, row in enumerate(rows)))
    return folder


def test_a_folder_without_masks_trains_without_the_grounding_loss_and_validates_on_its_own_captions(tmp_path):
    captions = [{"text": f"a red thing {k}"} for k in range(8)]
    folder = user_folder(tmp_path / "user", captions)
    run = tmp_path / "run"
    overrides = [f"data.dataset={folder}", f"cache_dir={tmp_path / 'cache'}", "train.batch_size=4", "train.max_steps=2",
                 "train.validate_every=2", "train.validation_steps=1", "text_encoder.tiny_clip.steps=2"]
    cfg = load_config(TINY.parent / "cpu.yaml", overrides)  # the default's validation prompts: shapes prompts
    cfg = load_config(TINY, [*overrides, f"train.validation_prompts={cfg.train.validation_prompts}"])
    assert cfg.train.grounding_weight > 0  # the default asks for grounding
    train(cfg, output_dir=str(run), progress=False, device="cpu")
    log = (run / "train.log").read_text()
    assert log.count("training without the grounding loss") == 1 and " grounding " not in log.split("step 2 loss")[1]
    assert (run / "model" / "model_index.json").is_file()
    # The shapes prompts say nothing of this data: six of its own captions stand in, and the run records them.
    prompts = load_config(run / "config.yaml").train.validation_prompts
    assert len(prompts) == 6 and set(prompts) <= {c["text"] for c in captions} and "validation prompts:" in log
    assert len(list((run / "validation" / "step_000002").glob("*.png"))) == 6


def test_a_folder_that_grounds_only_some_rows_is_a_clear_error(tmp_path):
    grounded = {"text": "a red thing", "mask_file": "mask.png", "word_objects": [0, 1, 1]}
    folder = user_folder(tmp_path / "user", [grounded, grounded, {"text": "a red thing"}, grounded])
    result = subprocess.run(
        [sys.executable, "train.py", "--device", "cpu", "--config", str(TINY), "--output-dir", str(tmp_path / "run"),
         f"data.dataset={folder}", f"cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "row 3 has no grounding" in result.stderr and "mask_file" in result.stderr and "train.grounding_weight: 0" in result.stderr
    assert not (tmp_path / "cache" / "text_encoders").exists()  # failed before training a tiny CLIP on it
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing in the way of the next one


def test_dry_run_prints_config_and_size(cache_dir):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(TINY), "--dry-run", f"cache_dir={cache_dir}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "UNet parameters:" in result.stdout and "learning_rate: 0.002" in result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_keep_identical_replicas_of_unet_and_tuned_text_tower(cache_dir, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
         "--dynamo_backend", "no", "train.py", "--device", "cpu",
         "--config", str(TINY), "--output-dir", str(run), "--no-progress", f"cache_dir={cache_dir}",
         "train.max_steps=10", "train.batch_size=8", "train.validate_every=0", "train.text_encoder_lr=1e-3"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run / "model" / "training_info.json").read_text())
    assert info["processes"] == 2 and info["replicas_identical"] is True  # the UNet and the tuned text tower
    assert info["text_encoder_tuned"] is True


def test_resume_with_a_different_text_encoder_or_model_is_a_clear_error(cache_dir, finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    wider = tiny_config(cache_dir, "text_encoder.tiny_clip.text_width=64", "text_encoder.tiny_clip.steps=2")  # states: last | input embedding
    with pytest.raises(CheckpointError, match="trained with text states of width 64.*gives width 128.*checkpoint's own config"):
        train(wider, output_dir=str(copy), resume="latest", progress=False, device="cpu")
    deeper = tiny_config(cache_dir, "unet.num_res_blocks=2")
    with pytest.raises(CheckpointError, match="does not fit the model this config builds"):
        train(deeper, output_dir=str(copy), resume="latest", progress=False, device="cpu")


def test_gradient_accumulation_updates_once_per_window(cache_dir, tmp_path):
    cfg = tiny_config(cache_dir, "train.gradient_accumulation_steps=2", "train.max_steps=4",
                      "train.checkpoint_every=4", "train.validate_every=0")
    run = tmp_path / "accumulated"
    train(cfg, output_dir=str(run), progress=False, device="cpu")
    checkpoint = run / "checkpoints" / "checkpoint-000004"
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [4]
    optimizer_state = torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]
    assert int(optimizer_state[0]["step"]) == 4  # 4 optimizer updates ...
    assert json.loads((checkpoint / "training_state.json").read_text())["micro_step"] == 8  # ... from 8 batches


def text_tower_weights(folder) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(folder).state_dict()


def test_text_encoder_is_tuned_by_default_and_frozen_on_request(cache_dir, finished_run, tmp_path):
    info = json.loads((finished_run / "model" / "training_info.json").read_text())
    source = text_tower_weights(info["text_encoder_source"])  # the cached tiny CLIP
    tuned = text_tower_weights(finished_run / "model" / "text_encoder")
    assert info["text_encoder_tuned"] is True and not all(torch.equal(source[k], tuned[k]) for k in source)

    cfg = tiny_config(cache_dir, "train.text_encoder_lr=0", "train.max_steps=10", "train.checkpoint_every=10",
                      "train.validate_every=0")
    run = tmp_path / "frozen"
    train(cfg, output_dir=str(run), progress=False, device="cpu")
    info = json.loads((run / "model" / "training_info.json").read_text())
    frozen = text_tower_weights(run / "model" / "text_encoder")
    assert info["text_encoder_tuned"] is False and all(torch.equal(source[k], frozen[k]) for k in source)
    # Tuning trains a copy: the cached tiny CLIP that both runs loaded is what the frozen run exported.


def test_tuned_text_tower_keeps_learning_after_a_validation(cache_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config(cache_dir, "train.max_steps=10", "train.checkpoint_every=5", "train.validate_every=5",
                      "train.keep_checkpoints=0")
    run = tmp_path / "tuned-validated"
    train(cfg, output_dir=str(run), progress=False, device="cpu")
    assert (run / "validation" / "step_000005.png").is_file()
    # Checkpoints hold the raw (not EMA) weights; model_1 is the text tower, prepared after the UNet.
    at_5, at_10 = (load_file(run / "checkpoints" / f"checkpoint-{s:06d}" / "model_1.safetensors") for s in (5, 10))
    assert not all(torch.equal(at_5[k], at_10[k]) for k in at_5)


def test_the_default_text_placer_trains_on_the_masks_exports_and_samples(cache_dir, tmp_path):
    from diffusion.sampling.pipeline import TextToImagePipeline
    from diffusion.sampling.settings import SamplerSettings

    cfg = tiny_config(cache_dir, "train.max_steps=10", "train.checkpoint_every=10", "train.validate_every=0", "train.log_every=5")
    assert cfg.unet.text_place_layers > 0  # the default
    run = tmp_path / "placer"
    train(cfg, output_dir=str(run), progress=False, device="cpu")
    places = [float(m) for m in re.findall(r" place ([0-9.]+)", (run / "train.log").read_text())]
    assert len(places) == 2 and all(p > 0 for p in places)
    pipe = TextToImagePipeline.from_run(run)
    width = pipe.text_encoder.config.hidden_size
    assert pipe.unet.placer is not None and pipe.unet.config.context_dim == 2 * width
    states, _ = pipe.encode(["a red circle"])  # (1, T, 2D): last state | input embedding
    assert states.shape[-1] == 2 * width and pipe.encoder.input_embeddings
    out = pipe(["a red circle left of a blue square"], [0], settings=SamplerSettings(steps=2), return_attention=True)
    assert out.images[0].size == (16, 16) and out.attention[0].tokens.words[3] == "left"


def test_without_masks_to_learn_from_the_run_has_no_placer_and_says_so(cache_dir, tmp_path):
    from diffusion.sampling.pipeline import TextToImagePipeline

    cfg = tiny_config(cache_dir, "train.grounding_weight=0", "train.max_steps=2", "train.checkpoint_every=2", "train.validate_every=0")
    run = tmp_path / "no-placer"
    train(cfg, output_dir=str(run), progress=False, device="cpu")
    log = (run / "train.log").read_text()
    assert log.count("training without the text placer") == 1 and " place " not in log
    assert load_config(run / "config.yaml").unet.text_place_layers == 0  # the saved config rebuilds this model
    pipe = TextToImagePipeline.from_run(run)
    assert pipe.unet.placer is None and pipe.unet.config.context_dim == pipe.text_encoder.config.hidden_size


def truncate(path: Path) -> None:
    """Cut a file short, as a full disk or a crash would leave it."""
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def test_resume_latest_skips_a_damaged_checkpoint_and_says_so(finished_run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(finished_run, damaged)
    shutil.rmtree(damaged / "model")
    truncate(damaged / "checkpoints" / "checkpoint-000040" / "model.safetensors")
    cfg = load_config(damaged / "config.yaml")
    train(cfg, output_dir=str(damaged), resume="latest", progress=False, device="cpu")
    log = (damaged / "train.log").read_text()
    assert re.search(r"checkpoint-000040 is damaged \(model.safetensors cannot be read .*\): resuming from checkpoint-000020", log)
    assert "resumed from" in log and "checkpoint-000020 at step 20" in log
    uninterrupted, resumed = exported_weights(finished_run), exported_weights(damaged)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)  # the 20 steps were trained again, exactly


def test_a_damaged_checkpoint_named_or_left_alone_is_a_clear_error(finished_run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(finished_run, damaged)
    newest = damaged / "checkpoints" / "checkpoint-000040"
    truncate(newest / "optimizer.bin")
    cfg = load_config(damaged / "config.yaml")
    with pytest.raises(CheckpointError, match=r"checkpoint-000040: the checkpoint is damaged: optimizer.bin .* Resume from .*checkpoint-000020"):
        train(cfg, output_dir=str(damaged), resume=str(newest), progress=False, device="cpu")
    truncate(damaged / "checkpoints" / "checkpoint-000020" / "model.safetensors")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged .*start the run again with another --output-dir"):
        train(cfg, output_dir=str(damaged), resume="latest", progress=False, device="cpu")
    assert newest.is_dir() and (damaged / "model").is_dir()  # nothing of the user's is removed


def test_fp16_on_the_cpu_is_refused_before_any_preparation(tmp_path):
    cfg = tiny_config(tmp_path / "cache", "train.mixed_precision=fp16")
    with pytest.raises(TrainingError, match="fp16 is for a GPU.*Use auto"):
        train(cfg, output_dir=str(tmp_path / "run"), progress=False, device="cpu")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_training_reads_nothing_back_to_the_host_per_step(cache_dir, tmp_path):
    """On a GPU each read of a tensor into Python waits for the device (tests/host_reads.py): the loop reads only at
    log lines, checkpoints and validations, so runs of 2 and 6 steps with one of each read the same things."""
    from collections import Counter

    from host_reads import HostReads

    counts = {}
    for steps in (2, 6):
        cfg = tiny_config(cache_dir, f"train.max_steps={steps}", f"train.log_every={steps}", f"train.checkpoint_every={steps}",
                          "train.validate_every=0")
        with HostReads() as seen:
            train(cfg, output_dir=str(tmp_path / f"steps-{steps}"), progress=False, device="cpu")
        counts[steps] = Counter((what, where) for what, _, where, _ in seen.reads)
    assert counts[6] == counts[2]
