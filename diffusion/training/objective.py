"""The training objective: one object that owns the noise schedule, the loss terms and their weights.

    loss = diffusion + grounding_weight * grounding + place_weight * place

- diffusion: the mean squared error of the UNet's v-prediction on images noised at a random timestep;
- grounding: each grounded word's cross-attention kept on its object (diffusion.training.grounding);
- place: the text placer's error on the masks' centres (diffusion.model.text_placer).

The schedule lives here and in the sampler, never in the UNet.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffusion.config import TrainConfig
from diffusion.model.text_placer import choose_layouts, layout_errors
from diffusion.model.unet import UNet
from diffusion.training.grounding import GroundingLoss, object_centres


def make_noise_scheduler() -> DDPMScheduler:
    """The noise schedule every model is trained with; the sampler reads it from the export."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",  # the cosine schedule (Nichol & Dhariwal 2021)
        # v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x_0: stays informative at the zero-SNR end, where
        # predicting the noise would be trivial (Salimans & Ho 2022; Lin et al. 2024).
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,  # the last step is pure noise, as sampling starts from pure noise (Lin et al. 2024)
        timestep_spacing="trailing",  # sampling steps include t = T (Lin et al. 2024)
        clip_sample=False,
    )


class Grounding(NamedTuple):
    """What the grounding loss needs for a batch: object ids per token (B, T) and per pixel (B, S, S)."""

    token_objects: torch.Tensor
    masks: torch.Tensor
    num_objects: int  # object ids are below this, in every batch of the dataset (CaptionedImageFolder.num_objects)


class LossTerms(NamedTuple):
    total: torch.Tensor  # scalar: what is minimised
    diffusion: torch.Tensor  # scalar
    grounding: torch.Tensor | None  # scalar, when grounding targets were given
    place: torch.Tensor | None  # scalar, when the UNet has a text placer and grounding targets were given


class Placement(NamedTuple):
    loss: torch.Tensor | None  # scalar
    layout: torch.Tensor | None  # (B,) the layout each image follows
    centres: torch.Tensor | None  # (B, T, K, 2) the placer's proposals, handed to the UNet (computed once per step)


# Relaxed winner-takes-all (Rupprecht et al., ICCV 2017): the layouts that lost still get this share of
# the pull towards the truth, so none is left untrained (and with one layout the loss is the plain one).
LOSER_WEIGHT = 0.05


class Objective:
    """`objective(net, images, states, mask, grounding)` -> LossTerms for one batch.

    `model` is the UNet whose text placer and pooled text condition the prompts (the weights `net`
    holds; `net` may be that UNet as accelerate prepared it); `autocast` is the mixed-precision context
    the net's own forward runs in, so that the conditioning computes as it would inside it."""

    def __init__(self, t: TrainConfig, model: UNet, autocast: Callable[[], ContextManager] = nullcontext):
        self.scheduler = make_noise_scheduler()
        self.model, self.autocast = model, autocast
        self.grounding_weight, self.coverage, self.place_weight = t.grounding_weight, t.grounding_coverage, t.place_weight

    def __call__(
        self, net: torch.nn.Module, images: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, grounding: Grounding | None
    ) -> LossTerms:
        """images: (B, C, H, W) in [-1, 1]; states, mask: (B, T, D), (B, T) the captions' text states."""
        b = images.shape[0]
        # 1. A random timestep and Gaussian noise per image; the noisy images and the target v.
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=images.device)
        noise = torch.randn_like(images)
        noisy = self.scheduler.add_noise(images, noise, timesteps)  # sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) noise
        target = self.scheduler.get_velocity(images, noise, timesteps)  # sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x_0
        # 2. The grounding loss is recorded from the cross-attention as the UNet runs.
        recorder = None
        if grounding is not None:
            alpha_bar = self.scheduler.alphas_cumprod.to(images.device)[timesteps]  # (B,) the signal left in each image
            recorder = GroundingLoss(grounding.token_objects, grounding.masks, grounding.num_objects, alpha_bar, self.coverage)
        # 3. The placer's layout for each image, then the prediction.
        place, layout, centres = self.place_loss(states, mask, grounding)
        with self.autocast():
            text = self.model.condition(states, mask, layout, centres)
        prediction = net(noisy, timesteps, text, recorder=recorder)
        diffusion = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
        # 4. The weighted sum.
        grounded = None if recorder is None else recorder.value()
        total = diffusion if grounded is None else diffusion + self.grounding_weight * grounded
        if place is not None:
            total = total + self.place_weight * place
        return LossTerms(total, diffusion, grounded, place)

    def place_loss(self, states: torch.Tensor, mask: torch.Tensor, grounding: Grounding | None) -> Placement:
        """The text placer's loss, the layout each image follows and the proposals; all None without a
        placer or grounding. Each proposed layout's error is the squared distance from its grounded tokens'
        centres to their masks' centres (diffusion.model.text_placer); the nearest layout takes the loss and
        is the one the UNet is shown."""
        placer = self.model.placer
        if placer is None or grounding is None:
            return Placement(None, None, None)
        centres = placer.centres(states.detach(), mask)  # (B, T, K, 2); trains the placer, not the tower
        tokens = grounding.token_objects[:, : states.shape[1]]  # (B, T)
        target, known = object_centres(grounding.masks, tokens, grounding.num_objects)  # (B, T, 2), (B, T)
        errors = layout_errors(centres.float(), target, known)  # (B, K)
        layout = choose_layouts(errors.detach(), known)  # (B,)
        nearest = errors.gather(1, layout[:, None])[:, 0]  # (B,)
        per_image = (1 - LOSER_WEIGHT) * nearest + LOSER_WEIGHT * errors.mean(dim=1)  # (B,)
        # The mean over images with at least one grounded token (0 where a batch has none), without asking the host.
        grounded = known.any(dim=1).float()  # (B,)
        return Placement((per_image * grounded).sum() / grounded.sum().clamp(min=1), layout, centres)
