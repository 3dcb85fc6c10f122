"""What would make a GPU wait, seen on the CPU: every call by the project's own code that reads a tensor's
values into Python or copies it to the host (.item(), .tolist(), .numpy(), .cpu(), bool(t), int(t), float(t),
nonzero(), a boolean-mask index). On a GPU each one waits for the device to finish; on the CPU they cost nothing,
which is why the suite records them instead of timing them. Reads made inside torch or other libraries are
theirs (torch keeps AdamW's step counter on the host on purpose) and are not recorded."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = Path(__file__).resolve().parent.parent / "diffusion"
READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class HostReads(TorchFunctionMode):
    """A context manager; `reads` lists (what, function, file:line, within) of each host read by our code,
    `within` naming the project's functions on the stack (innermost first)."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str, str, tuple[str, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(args[1:]))
        if name in READS or masked:
            caller = sys._getframe(1)
            path = Path(caller.f_code.co_filename).resolve()
            if path.is_relative_to(PACKAGE):
                where = f"{path.relative_to(PACKAGE.parent)}:{caller.f_lineno}"
                self.reads.append(("boolean index" if masked else name, caller.f_code.co_name, where, _within(caller)))
        return func(*args, **(kwargs or {}))


def _flat(items):
    for item in items:
        if isinstance(item, (tuple, list)):
            yield from _flat(item)
        else:
            yield item


def _within(frame) -> tuple[str, ...]:
    """'file.py:function' of every frame of the project's code on the stack, innermost first."""
    names = []
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path.is_relative_to(PACKAGE):
            names.append(f"{path.name}:{frame.f_code.co_name}")
        frame = frame.f_back
    return tuple(names)
