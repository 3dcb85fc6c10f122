"""The sampling loop: one plain function over any diffusers scheduler, with classifier-free guidance.

Conditional and unconditional predictions are computed in one batched forward pass; the
conditional half comes first, so a recorder that wants only its maps takes rows [:B].
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion import sampler_defaults as defaults
from diffusion.attention import AttentionRecorder
from diffusion.layout_guidance import LayoutGuidance

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "ddpm": DDPMScheduler,
}


def make_sampling_scheduler(name: str, training_scheduler_config: dict) -> SchedulerMixin:
    """A sampler of the given name that shares the training schedule (betas, prediction type)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(training_scheduler_config)


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One generator per image, so any image can be regenerated alone from its seed: (B, *shape)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance of model outputs (B, C, S, S), optionally rescaled.

    rescale in [0, 1] blends the guided output with itself scaled to the conditional output's
    standard deviation, per image (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", sec. 3.4, for zero terminal SNR); like diffusers, it acts on the model output.
    """
    # 1. uncond + w (cond - uncond): (B, C, S, S).
    guided = uncond + scale * (cond - uncond)
    if rescale == 0:
        return guided
    # 2. Per image, bring the guided output's std back to the conditional one's, and blend.
    std_cond = cond.std(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    std_guided = guided.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)  # (B, 1, 1, 1)
    return rescale * guided * (std_cond / std_guided) + (1 - rescale) * guided


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    null_context: torch.Tensor,
    null_mask: torch.Tensor,
    generators: list[torch.Generator],
    num_steps: int = defaults.STEPS,
    guidance_scale: float = defaults.GUIDANCE,
    guidance_rescale: float = 0.0,
    recorder_for_step: Callable[[int, int], AttentionRecorder | None] | None = None,
    callback: Callable[[int, int], None] | None = None,
    layout: LayoutGuidance | None = None,
) -> torch.Tensor:
    """Denoise pure noise into images in [-1, 1]: (B, C, S, S).

    context: (B, T, D) text states of the prompts, context_mask: (B, T); null_*: the unconditional
    (empty or negative) prompt's, (1 or B, T, D) / (1 or B, T); guidance_rescale: see `guide`.
    `recorder_for_step(i, t)` gives the attention recorder to pass to the UNet at step i (or None);
    `callback(i, t)` runs after step i. `layout`: optional layout guidance of the first steps
    (diffusion.layout_guidance), which moves x_t before the step's prediction.
    """
    b = context.shape[0]
    size = unet.config.sample_size
    device = context.device
    scheduler.set_timesteps(num_steps, device=device)
    x = initial_noise(generators, (unet.config.in_channels, size, size), device) * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    text, text_mask = context, context_mask  # (B, T, D), (B, T): the prompts alone, for layout guidance
    if guided:
        # Conditional rows first, then the unconditional ones: (2B, T, D).
        context = torch.cat([context, null_context.expand(b, -1, -1)])
        context_mask = torch.cat([context_mask, null_mask.expand(b, -1)])
    # Schedulers that add noise in their step (DDPM) draw it from each image's own generator.
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        # 0. Optionally, move x_t until the attention maps put each stated relation's sides in order.
        if layout is not None and layout.applies_at(i, num_steps):
            x = layout.nudge(
                lambda x_t, capture: unet(scheduler.scale_model_input(x_t, t), t.expand(b), text, text_mask, recorder=capture),
                x,
            )
        # 1. Model output for the conditional and unconditional rows in one pass.
        recorder = recorder_for_step(i, int(t)) if recorder_for_step is not None else None
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        out = unet(x_in, t.expand(x_in.shape[0]), context, context_mask, recorder=recorder)
        # 2. Classifier-free guidance: uncond + w (cond - uncond), optionally rescaled.
        if guided:
            cond, uncond = out.chunk(2)  # (B, C, S, S) each
            out = guide(cond, uncond, guidance_scale, guidance_rescale)
        # 3. One scheduler step towards t-1.
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        if callback is not None:
            callback(i, int(t))
    return x.clamp(-1, 1)
