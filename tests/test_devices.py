"""The device a command runs on: chosen once, refused clearly where it is missing, and results handed to the host."""

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from diffusion.devices import DeviceError, resolve_device, to_host
from diffusion.errors import UserError

from conftest import ROOT, tiny_config

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the no-GPU message cannot be shown here")


@dataclass
class Maps:
    global_map: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)


def test_to_host_moves_every_tensor_and_keeps_everything_else():
    maps = Maps(torch.ones(2, 3, dtype=torch.bfloat16), {"down.0": torch.zeros(2, dtype=torch.float16)}, [999, 0])
    images, host = to_host((torch.arange(4), maps))
    assert images.dtype == torch.int64  # only floating tensors become float32
    assert host.global_map.dtype == torch.float32 and host.layers["down.0"].dtype == torch.float32
    assert host.steps == [999, 0] and torch.equal(host.global_map, torch.ones(2, 3))
    assert maps.global_map.dtype == torch.bfloat16  # the original is left as it was


def test_auto_takes_the_gpu_only_where_there_is_one_and_a_bad_name_is_named():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="'gpu' is not a device; use auto"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match="only cpu and cuda"):
        resolve_device("meta")


@no_gpu
def test_a_missing_gpu_is_said_with_the_fix_by_every_command(finished_run, tmp_path, capsys):
    from diffusion.demo import Demo
    from diffusion.evaluation.cli import main as evaluate

    with pytest.raises(UserError, match=r"--device cuda: no GPU is available here \(.*\); use --device cpu"):
        resolve_device("cuda")
    result = subprocess.run([sys.executable, "sample.py", "--device", "cuda", "--model", str(finished_run), "--prompt", "a red circle",
                             "--out", str(tmp_path / "samples")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "no GPU is available here" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "samples").exists()
    assert evaluate(["--device", "cuda", "--model", str(finished_run), "--quick", "--out", str(tmp_path / "eval")]) == 2
    assert "no GPU is available here" in capsys.readouterr().err and not (tmp_path / "eval").exists()
    with pytest.raises(DeviceError, match="use --device cpu"):
        Demo(finished_run, device="cuda")
    from diffusion.training.loop import train

    with pytest.raises(DeviceError, match="no GPU is available here"):
        train(tiny_config(tmp_path / "cache"), output_dir=str(tmp_path / "run"), progress=False, device="cuda")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # said before any preparation
