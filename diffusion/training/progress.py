"""Training's progress bar: the budget that will actually stop the run, and the figures a user wants.

A run stops at `train.max_steps` or after `train.max_minutes`, whichever comes first. The bar shows
the fraction of that nearer budget and the time left until it, estimated from this session's pace:

    training  34%|███▍      | step 760/100000 | 78 img/s | loss 0.0912 | 19:45 left (time limit)
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(max(seconds, 0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class TrainingProgress:
    def __init__(self, start_step: int, max_steps: int, max_minutes: float, enabled: bool = True):
        self.start_step, self.max_steps, self.budget_s = start_step, max_steps, 60 * max_minutes
        self.started = time.monotonic()
        self.bar = tqdm(
            total=1000, disable=not enabled, dynamic_ncols=True,
            bar_format="training {percentage:3.0f}%|{bar}| {desc}",  # desc: the figures, set below
        )
        self.figures = ""

    def time_left(self, step: int) -> tuple[float | None, str]:
        """Seconds until the run stops and which budget stops it (None before the pace is known)."""
        elapsed = time.monotonic() - self.started
        done = step - self.start_step
        by_steps = (self.max_steps - step) * elapsed / done if done > 0 else None
        by_time = self.budget_s - elapsed if self.budget_s > 0 else None
        if by_time is not None and (by_steps is None or by_time < by_steps):
            return by_time, "time limit"
        return by_steps, "max_steps"

    def fraction(self, step: int) -> float:
        by_steps = step / self.max_steps
        if self.budget_s <= 0:
            return by_steps
        return max(by_steps, (time.monotonic() - self.started) / self.budget_s)

    def update(self, step: int, images_per_sec: float | None = None, loss: float | None = None) -> None:
        if images_per_sec is not None and loss is not None:
            self.figures = f" | {images_per_sec:.0f} img/s | loss {loss:.4f}"
        left, which = self.time_left(step)
        left_text = "estimating" if left is None else f"{format_duration(left)} left ({which})"
        self.bar.set_description_str(f"step {step}/{self.max_steps}{self.figures} | {left_text}", refresh=False)
        self.bar.n = min(1000, int(1000 * self.fraction(step)))
        self.bar.refresh() if self.bar.n >= 1000 else self.bar.update(0)

    def close(self) -> None:
        self.bar.close()


class LogWindow:
    """What happened since the last log line: images seen and each loss term's sum, kept on the device, so
    that no step waits for it; `means` reads them to the host once per log line (or checkpoint)."""

    def __init__(self):
        self.start, self.images, self.steps = time.monotonic(), 0, 0
        self.names: tuple[str, ...] = ()
        self.sums: torch.Tensor | None = None  # (terms,) on the device

    def add(self, images: int, terms: dict[str, torch.Tensor]) -> None:
        """`terms`: name -> scalar loss tensor of this step (the same names every step)."""
        values = torch.stack([value.detach().float() for value in terms.values()])  # (terms,)
        self.sums = values if self.sums is None else self.sums + values
        self.names, self.images, self.steps = tuple(terms), self.images + images, self.steps + 1

    def means(self) -> dict[str, float]:
        """Each term's mean over the window (one read from the device); empty before the first step."""
        if self.sums is None:
            return {}
        return dict(zip(self.names, (self.sums / self.steps).tolist()))

    def scalars(self, means: dict[str, float], learning_rate: float) -> dict[str, float]:
        """The logged scalars: the window's loss means, the learning rate and images per second."""
        elapsed = time.monotonic() - self.start
        return {**means, "learning_rate": learning_rate, "images_per_sec": self.images / max(elapsed, 1e-9)}

    @staticmethod
    def line(step: int, s: dict[str, float]) -> str:
        grounding = f" grounding {s['grounding_loss']:.4f}" if "grounding_loss" in s else ""
        place = f" place {s['place_loss']:.4f}" if "place_loss" in s else ""
        return f"step {step} loss {s['loss']:.4f} lr {s['learning_rate']:.2e} {s['images_per_sec']:.0f} img/s{grounding}{place}"
