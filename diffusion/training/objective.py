"""The training objective: noise clean images with a diffusers scheduler and regress the target.

The schedule lives here and in the sampler, never in the UNet.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffusion.config import NoiseConfig
from diffusion.model.text_placer import choose_layouts, layout_errors
from diffusion.training.grounding import GroundingLoss, object_centres

PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"noise.prediction_type must be one of {PREDICTION_TYPES}, got {cfg.prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing=cfg.timestep_spacing,
        clip_sample=False,
    )


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep: (B,)."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alpha_bar / (1 - alpha_bar).clamp(min=1e-8)


class Grounding(NamedTuple):
    """What the grounding loss needs for a batch: object ids per token (B, T) and per pixel (B, S, S)."""

    token_objects: torch.Tensor
    masks: torch.Tensor
    num_objects: int  # object ids are below this, in every batch of the dataset (CaptionedImageFolder.num_objects)
    coverage: float = 0.0  # weight of the coverage term (diffusion.training.grounding)


def noised(
    scheduler: DDPMScheduler, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy images at `timesteps` (B,) and the UNet's regression target, both (B, C, H, W)."""
    # Forward process: x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) noise.
    noisy = scheduler.add_noise(images, noise, timesteps)
    # The target: the noise, or v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x_0.
    if scheduler.config.prediction_type == "epsilon":
        return noisy, noise
    return noisy, scheduler.get_velocity(images, noise, timesteps)


class LossTerms(NamedTuple):
    diffusion: torch.Tensor  # scalar
    grounding: torch.Tensor | None  # scalar, when grounding targets were given
    place: torch.Tensor | None = None  # scalar, when the UNet has a text placer and grounding targets were given


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    min_snr_gamma: float = 0.0,
    grounding: Grounding | None = None,
) -> LossTerms:
    """Mean squared error of the UNet's prediction on noised `images` (B, C, H, W) in [-1, 1];
    with `grounding`, also the grounding loss of its cross-attention (diffusion.training.grounding)."""
    b = images.shape[0]
    # 1. A random timestep and Gaussian noise per image; 2. the noisy images and the target.
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=images.device)
    noisy, target = noised(scheduler, images, torch.randn_like(images), timesteps)
    recorder = None
    if grounding is not None:
        alpha_bar = scheduler.alphas_cumprod.to(images.device)[timesteps]  # (B,) the signal left in each image
        recorder = GroundingLoss(
            grounding.token_objects, grounding.masks, grounding.num_objects, weights=alpha_bar, coverage=grounding.coverage
        )
    place, layout, centres = place_loss(unet, context, context_mask, grounding)
    prediction = unet(noisy, timesteps, context, context_mask, recorder=recorder, layout=layout, centres=centres)
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    # 3. Optional min-SNR-gamma weighting (Hang et al. 2023), expressed for the chosen target.
    if min_snr_gamma > 0:
        ratio = snr(scheduler, timesteps)
        clipped = ratio.clamp(max=min_snr_gamma)
        weight = clipped / ratio.clamp(min=1e-8) if scheduler.config.prediction_type == "epsilon" else clipped / (ratio + 1)
        per_image = per_image * weight
    return LossTerms(per_image.mean(), None if recorder is None else recorder.value(), place)


# Relaxed winner-takes-all (Rupprecht et al., ICCV 2017): the layouts that lost still get this share of
# the pull towards the truth, so none is left untrained (and with one layout the loss is the plain one).
LOSER_WEIGHT = 0.05


class Placement(NamedTuple):
    loss: torch.Tensor | None  # scalar
    layout: torch.Tensor | None  # (B,) the layout each image follows
    centres: torch.Tensor | None  # (B, T, K, 2) the placer's proposals, handed to the UNet (computed once per step)


def place_loss(unet: torch.nn.Module, context: torch.Tensor, context_mask: torch.Tensor, grounding: Grounding | None) -> Placement:
    """The text placer's loss, the layout each image follows and the proposals; all None without a
    placer or grounding. Each proposed layout's error is the squared distance from its grounded tokens'
    centres to their masks' centres (diffusion.model.text_placer); the nearest layout takes the loss and
    is the one the UNet is shown."""
    placer = getattr(getattr(unet, "module", unet), "placer", None)  # accelerate may wrap the UNet
    if placer is None or grounding is None:
        return Placement(None, None, None)
    centres = placer.centres(context.detach(), context_mask)  # (B, T, K, 2); trains the placer, not the tower
    tokens = grounding.token_objects[:, : context.shape[1]]  # (B, T)
    target, known = object_centres(grounding.masks, tokens, grounding.num_objects)  # (B, T, 2), (B, T)
    errors = layout_errors(centres.float(), target, known)  # (B, K)
    layout = choose_layouts(errors.detach(), known)  # (B,)
    nearest = errors.gather(1, layout[:, None])[:, 0]  # (B,)
    per_image = (1 - LOSER_WEIGHT) * nearest + LOSER_WEIGHT * errors.mean(dim=1)  # (B,)
    # The mean over images with at least one grounded token (0 where a batch has none), without asking the host.
    grounded = known.any(dim=1).float()  # (B,)
    return Placement((per_image * grounded).sum() / grounded.sum().clamp(min=1), layout, centres)
