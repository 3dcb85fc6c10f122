"""The sampling loop: one plain function over any diffusers scheduler, with classifier-free guidance
and generic per-step hooks (as k-diffusion's `callback`, but able to record attention and move x_t).

Conditional and unconditional predictions are computed in one batched forward pass; the
conditional half comes first, so a recorder that wants only its maps takes rows [:B].
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Callable

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion.model.attention import AttentionRecorder

# denoise(x_t, recorder) -> the UNet's output on the prompts alone (B rows, no guidance), with the
# attention of that pass reported to `recorder`: what a hook that steers x_t differentiates.
Denoise = Callable[[torch.Tensor, AttentionRecorder], torch.Tensor]


class SamplingHook:
    """Per-step hooks of `sample`; each method's default does nothing. At step i (timestep t):
    `before_step` may move x_t; `recorder` and `self_recorder` may ask for the step's cross- and
    self-attention probabilities, and replace them (an edit's controller); `after_step` observes the
    step's estimate of the clean image. Any object with these four methods is a hook (the maps'
    AttentionAggregator is one, in a layer below this that does not import it). The recorders of
    several hooks run in the hooks' order, each seeing what the one before returned."""

    def before_step(self, i: int, t: int, x: torch.Tensor, denoise: Denoise) -> torch.Tensor:
        return x

    def recorder(self, i: int, t: int) -> AttentionRecorder | None:
        return None

    def self_recorder(self, i: int, t: int) -> AttentionRecorder | None:
        return None

    def after_step(self, i: int, t: int, denoised: torch.Tensor) -> None:
        """`denoised`: (B, C, S, S), the step's estimate of x_0 for the prompts' images."""


class OnStep(SamplingHook):
    """A hook that calls fn(i, t) after every step (a progress bar, a log line)."""

    def __init__(self, fn: Callable[[int, int], None]):
        self.fn = fn

    def after_step(self, i: int, t: int, denoised: torch.Tensor) -> None:
        self.fn(i, t)


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One generator per image, so any image can be regenerated alone from its seed: (B, *shape)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def seed_layouts(seeds: Sequence[int], layouts: int) -> torch.Tensor:
    """The text placer's layout each image follows, drawn from its seed by a generator of its own (so
    the noise of a seed does not depend on it): (B,)."""
    return torch.tensor([int(torch.randint(layouts, (1,), generator=torch.Generator().manual_seed(s))) for s in seeds])


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of model outputs (B, C, S, S): uncond + w (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def denoised_estimate(scheduler: SchedulerMixin, step_output) -> torch.Tensor:
    """The step's estimate of the clean image x_0, (B, C, S, S): the scheduler's own where its step
    returns one (DDPM, DDIM, Euler); DPM-Solver++ converts each model output to x_0 and keeps the last."""
    x0 = getattr(step_output, "pred_original_sample", None)
    return x0 if x0 is not None else scheduler.model_outputs[-1]


def _one_recorder(recorders: list[AttentionRecorder]) -> AttentionRecorder | None:
    """The step's recorders as one (the UNet takes one), in order, each seeing what the last returned."""
    if len(recorders) <= 1:
        return recorders[0] if recorders else None

    def record_all(layer_name: str, probs: torch.Tensor) -> torch.Tensor:
        for record in recorders:
            replaced = record(layer_name, probs)
            probs = probs if replaced is None else replaced
        return probs

    return record_all


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    null_context: torch.Tensor,
    null_mask: torch.Tensor,
    generators: list[torch.Generator],
    num_steps: int,
    guidance_scale: float,
    hooks: Sequence[SamplingHook] = (),
    layouts: torch.Tensor | None = None,
    centres: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise pure noise into images in [-1, 1]: (B, C, S, S).

    context: (B, T, D) text states of the prompts, context_mask: (B, T); null_*: the unconditional
    (empty or negative) prompt's, (1 or B, T, D) / (1 or B, T). `hooks`: see `SamplingHook`.
    layouts: (B,) which of the text placer's layouts each image follows (`seed_layouts`; None: the first).
    centres: (B, T, K, 2) the text placer's proposals for the prompts, where the caller fixes them (an
    edit follows its source's); None: the placer's own.
    """
    b = context.shape[0]
    size = unet.config.sample_size
    device = context.device
    scheduler.set_timesteps(num_steps, device=device)
    x = initial_noise(generators, (unet.config.in_channels, size, size), device) * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    text, text_mask = context, context_mask  # (B, T, D), (B, T): the prompts alone
    if guided:
        # Conditional rows first, then the unconditional ones: (2B, T, D).
        context = torch.cat([context, null_context.expand(b, -1, -1)])
        context_mask = torch.cat([context_mask, null_mask.expand(b, -1)])
    row_layouts = torch.cat([layouts, layouts]) if guided and layouts is not None else layouts  # one per row
    row_centres = centres
    if guided and centres is not None:  # the unconditional rows' own: (2B, T, K, 2)
        row_centres = torch.cat([centres, unet.placer.centres(context[b:], context_mask[b:])])
    # The text as the UNet reads it (its placer and pooled text) is made at every step: made once, the
    # images stay the same bit for bit but the maps move by ~2e-7 (docs/tried.md).
    # Schedulers that add noise in their step (DDPM) draw it from each image's own generator.
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    # The timesteps as device tensors for the UNet and as host integers for the hooks (read once, not per step).
    for i, (t, t_host) in enumerate(zip(scheduler.timesteps, scheduler.timesteps.tolist())):
        # 0. Hooks may move x_t first (layout guidance), through a conditional pass they can differentiate.
        def denoise(x_t: torch.Tensor, recorder: AttentionRecorder, t=t) -> torch.Tensor:
            prompts = unet.condition(text, text_mask, layouts, centres)  # (B, T, D): the prompts alone
            return unet(scheduler.scale_model_input(x_t, t), t.expand(b), prompts, recorder=recorder)

        for hook in hooks:
            x = hook.before_step(i, t_host, x, denoise)
        # 1. Model output for the conditional and unconditional rows in one pass.
        recorder = _one_recorder([r for hook in hooks if (r := hook.recorder(i, t_host)) is not None])
        self_recorder = _one_recorder([r for hook in hooks if (r := hook.self_recorder(i, t_host)) is not None])
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        rows = unet.condition(context, context_mask, row_layouts, row_centres)  # (2B or B, T, D)
        out = unet(x_in, t.expand(x_in.shape[0]), rows, recorder, self_recorder).float()
        # 2. Classifier-free guidance.
        if guided:
            cond, uncond = out.chunk(2)  # (B, C, S, S) each
            out = guide(cond, uncond, guidance_scale)
        # 3. One scheduler step towards t-1.
        step = scheduler.step(out, t, x, **step_kwargs)
        x = step.prev_sample
        for hook in hooks:
            hook.after_step(i, t_host, denoised_estimate(scheduler, step))
    return x.clamp(-1, 1)
