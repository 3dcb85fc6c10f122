"""The samplers a trained model can use: diffusers schedulers sharing its training noise schedule."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion.sampling.settings import SCHEDULER_NAMES

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "ddpm": DDPMScheduler,
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def make_sampling_scheduler(name: str, training_scheduler_config: dict) -> SchedulerMixin:
    """A sampler of the given name that shares the training schedule (betas, prediction type)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(training_scheduler_config)
