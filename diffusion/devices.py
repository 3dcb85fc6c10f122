"""The device a command runs on, chosen once, and the one way results come back to the host.

Every command takes `--device auto|cpu|cuda` (auto: the GPU where there is one). `use_device`
resolves it, refuses a GPU that is not there with a message naming the fix, and on CUDA turns on
what costs nothing in accuracy at our sizes (TF32 matrix products, cuDNN's autotuner).
`native_bf16` says whether a device computes bf16 in hardware (emulated bf16 is many times slower).
`to_host` is the crossing for what a model hands back (images, maps, per-step snapshots): tensors on
the CPU, floating ones in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from diffusion.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "auto (default: the GPU where there is one), cpu, or cuda (cuda:N for the N-th GPU)"


class DeviceError(UserError, RuntimeError):
    """A --device that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda where available, else cpu; 'cpu', 'cuda', 'cuda:N' as named, if this machine has it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name!r} is not a device; use {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA GPU"
            raise DeviceError(f"--device {name}: no GPU is available here ({why}); use --device cpu, or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise DeviceError(f"--device {name}: only cpu and cuda are supported; use {DEVICE_HELP}")
    return device


def use_device(name: str) -> torch.device:
    """`resolve_device`, and on CUDA the settings every command here wants: TF32 for float32 matrix
    products and convolutions (10-bit mantissa inputs, float32 accumulation), and cuDNN picking the
    fastest convolution for our fixed shapes."""
    device = resolve_device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a GPU of compute capability 8.0 or later (not the
    emulation that torch.cuda.is_bf16_supported() also counts by default), or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def sampling_autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast for sampling on a GPU that computes it natively; a no-op elsewhere (sampling on the
    CPU stays float32, as every figure in BENCHMARKS.md was measured)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and native_bf16(device))


def to_host(value: Any) -> Any:
    """`value` with every tensor in it (in dataclasses, dicts, lists, tuples) detached and on the CPU,
    floating ones as float32; anything else as it is. The one crossing from the device to the host."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.float() if value.is_floating_point() else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_host(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    if isinstance(value, dict):
        return {key: to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(item) for item in value)
    return value


def add_device_argument(parser) -> None:
    """The --device flag every command shares."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
