"""Ctrl-C during training: finish the step, write a checkpoint, print the resume command."""

from __future__ import annotations

import signal
import sys
import threading

import torch
from accelerate import Accelerator


class StopOnInterrupt:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C stops at once).
    A context manager: the previous handler is back however the loop ends."""

    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        self.flag = True
        self.restore()  # the next Ctrl-C interrupts at once
        print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def requested(self, accelerator: Accelerator, every: int = 1, step: int = 0) -> bool:
        """True on every process once any process was interrupted (they must checkpoint together). Several
        processes agree on it by a reduction that waits for every device, so they ask at every `every`-th step only."""
        if accelerator.num_processes == 1:
            return self.flag
        if step % every:
            return False
        flag = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
