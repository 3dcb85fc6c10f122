"""The GPU path, as a user with one GPU takes it: train with validation, resume, sample with maps, the demo's
request, the evaluation. Each test names the failure it guards against (each happened, or would have, on the code
before the fix); they run where CUDA exists and skip, saying so, elsewhere. `bash bench/gpu_check.sh` runs them
with the GPU's figures."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from diffusion.devices import resolve_device
from diffusion.training.loop import train
from diffusion.training.setup import resolve_precision

from conftest import ROOT, exported_weights, tiny_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: the GPU smoke tests run where there is one (bench/gpu_check.sh)"
)


@pytest.fixture(scope="module")
def gpu_run(cache_dir, tmp_path_factory):
    """The tiny preset trained on the GPU: checkpoints at 20 and 40, validation (sampling with maps) at 40, export."""
    run = tmp_path_factory.mktemp("gpu") / "tiny"
    train(tiny_config(cache_dir), output_dir=str(run), progress=False, device="cuda")
    return run


def test_training_on_the_gpu_validates_with_maps_and_exports(gpu_run):
    # Before: validation exported maps still on the GPU (.numpy() of a CUDA tensor) and the run died at step 40.
    log = (gpu_run / "train.log").read_text()
    assert re.search(r"device cuda", log) and "the GPU" in log  # the precision's reason names the GPU
    assert (gpu_run / "validation" / "step_000040" / "a-red-circle_seed0.attn" / "maps.npz").is_file()
    assert (gpu_run / "model" / "model_index.json").is_file()


def test_resume_on_the_gpu_puts_the_ema_on_the_gpu(gpu_run, tmp_path):
    # Before: accelerate loaded the EMA weights onto the CPU and the first ema.step after --resume mixed devices.
    killed = tmp_path / "killed"
    shutil.copytree(gpu_run, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-000040")
    shutil.rmtree(killed / "model")
    from diffusion.config import load_config

    train(load_config(killed / "config.yaml"), output_dir=str(killed), resume="latest", progress=False, device="cuda")
    uninterrupted, resumed = exported_weights(gpu_run), exported_weights(killed)
    # GPU kernels need not be bit-reproducible (cuDNN's autotuner, atomics); the resumed run lands near the uninterrupted one.
    assert all(torch.allclose(uninterrupted[k], resumed[k], rtol=1e-2, atol=1e-3) for k in uninterrupted)


def test_sampling_on_the_gpu_hands_images_maps_and_snapshots_to_the_host(gpu_run, tmp_path):
    from diffusion.maps.aggregate import MapSettings
    from diffusion.sampling.pipeline import TextToImagePipeline
    from diffusion.sampling.settings import SamplerSettings

    pipe = TextToImagePipeline.from_run(gpu_run, device="cuda")
    settings = SamplerSettings(steps=4, layout_guidance=0.05)  # layout guidance differentiates through the GPU
    out = pipe(["a red circle left of a blue square"], [0], settings, return_attention=True,
               map_settings=MapSettings(snapshot_every=1))
    maps = out.attention[0]
    tensors = [maps.global_map, *maps.layers.values(), *maps.snapshots.values()]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and len(maps.snapshots) == 4
    # The CLI, as a user runs it: images and maps written.
    result = subprocess.run([sys.executable, "sample.py", "--model", str(gpu_run), "--prompt", "a red circle", "--steps", "3",
                             "--out", str(tmp_path / "samples"), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "samples" / "a-red-circle_seed0.attn" / "maps.npz").is_file()


def test_the_demo_and_the_evaluation_run_on_the_gpu_by_default(gpu_run, tmp_path):
    # Before: both defaulted to the CPU, and on the GPU both failed exporting the maps.
    from diffusion.demo import Demo
    from diffusion.evaluation.cli import main as evaluate
    from diffusion.sampling.settings import SamplerSettings

    demo = Demo(gpu_run)
    assert demo.pipe.unet.device.type == "cuda"
    page, _ = demo.page("a red circle", "a blue circle", 0, SamplerSettings(steps=3))
    assert "a red circle" in page
    out = tmp_path / "eval"
    assert evaluate(["--model", str(gpu_run), "--quick", "--seeds", "1", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["fidelity"]["applies"] is True


def test_every_command_defaults_to_the_gpu():
    assert resolve_device("auto").type == "cuda"


def test_auto_precision_is_bf16_only_where_the_gpu_computes_it_natively():
    # Before: torch.cuda.is_bf16_supported() also counts emulated bf16, so a V100 or T4 took slow bf16 over fp16.
    major, _ = torch.cuda.get_device_capability()
    assert resolve_precision("auto", torch.device("cuda"))[0] == ("bf16" if major >= 8 else "fp16")


def test_the_cpu_tests_stay_on_the_cpu_where_there_is_a_gpu(finished_run):
    # Before: train() took the GPU whenever there was one, so the CPU suite ran the (then broken) GPU path.
    log = (finished_run / "train.log").read_text()
    assert "device cpu" in log and "this CPU" in log


def test_a_training_step_never_waits_for_the_host(cache_dir):
    """The step (batch, losses, backward, AdamW, EMA) raises if anything in it synchronises with the host."""
    from diffusers.training_utils import EMAModel

    from diffusion.data.folder import CaptionedImageFolder
    from diffusion.text.encoder import TextEncoder
    from diffusion.training.batches import TrainingBatches
    from diffusion.training.grounding import TokenObjectTable
    from diffusion.training.objective import Objective
    from diffusion.training.prepare import prepare_dataset, prepare_text_encoder
    from diffusion.training.setup import build_unet
    from diffusion.training.text_states import TextStateCache

    cfg, device = tiny_config(cache_dir), torch.device("cuda")
    train_dir, _ = prepare_dataset(cfg.data, cache_dir, progress=False)
    source = prepare_text_encoder(cfg.text_encoder, cfg.data, cache_dir, progress=False)
    encoder = TextEncoder.from_pretrained(source, input_embeddings=True).to(device)
    dataset = CaptionedImageFolder(train_dir, cfg.data.image_size, masks=True, progress=False)
    states = TextStateCache(encoder, dataset.all_captions, progress=False)
    batches = TrainingBatches(dataset, states, TokenObjectTable(encoder.tokenizer, encoder.max_length), cfg.train, device)
    unet = build_unet(cfg, encoder.width).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True)
    ema = EMAModel(unet.parameters(), foreach=True)
    ema.to(device)
    objective = Objective(cfg.train, unet)
    for step in range(3):  # the first step moves the schedule's tables to the GPU once
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            images, rows, grounding = batches(step)
            context, mask = states.lookup(rows)
            objective(unet, images, context, mask, grounding).total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(unet.parameters())
        finally:
            torch.cuda.set_sync_debug_mode("default")
