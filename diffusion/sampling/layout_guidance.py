"""Layout guidance: steer the first sampling steps so that each relation the prompt states holds.

A model can draw the right objects in the wrong places ("a red circle left of a blue square" with
the circle on the right). Its cross-attention maps already say where each word's object is forming,
so the sampler can check the relation on them and move the noisy image until it holds, in the manner
of Attend-and-Excite (Chefer et al. 2023) and cross-attention layout guidance (Chen et al. 2024,
"Training-free layout control with cross-attention guidance"). No training, no boxes from the user:
the relations are read from the prompt's own words ("<phrase> left of / right of / above / below
<phrase>", clauses joined by "and").

At each of the first `until` fraction of the sampling steps, before the model's usual prediction:

1. one conditional pass of the UNet on x_t with gradients, recording every cross-attention layer;
2. each side of a relation gets a map: the head-mean attention of its words' tokens, normalised to sum
   to one over the pixels; its centroid along the relation's axis, in image widths (0..1);
3. loss = relu(margin - gap) per relation, gap = how far the reference's centroid lies beyond the
   subject's in the stated direction; summed over an image's relations, averaged over layers;
4. x_t <- x_t - strength * grad / rms(grad), per image (an image whose relations already hold with the
   margin, or that states none, has no gradient and is left as it is).

The step is in the units of x_t, so `strength` suits variance-preserving samplers (DDPM, DDIM, DPM++);
for Euler, whose x_t is scaled by sigma, it is relatively weaker.
"""

from __future__ import annotations

import math

import torch

from diffusion.sampling.loop import Denoise, SamplingHook
from diffusion.text.prompt_tokens import PromptTokens
from diffusion.data.relations import stated_relations

UNTIL = 0.15  # the fraction of sampling steps guided: the first ones, where the layout is chosen
MARGIN = 0.15  # in image widths: how far apart the two sides' centroids must lie


class AttentionCapture:
    """An AttentionRecorder that keeps every layer's probabilities, gradients included."""

    def __init__(self):
        self.layers: list[torch.Tensor] = []

    def __call__(self, layer_name: str, probs: torch.Tensor) -> None:
        self.layers.append(probs)  # (B, heads, HW, T)


class RelationTargets:
    """The stated relations of a batch of prompts, as token weights: one row per relation."""

    def __init__(self, prompts: list[PromptTokens], max_length: int):
        images, subjects, references, axes, signs = [], [], [], [], []
        for b, tokens in enumerate(prompts):
            for rel in stated_relations(tokens.words):
                images.append(b)
                subjects.append(self._weights(tokens, rel.subject, max_length))
                references.append(self._weights(tokens, rel.reference, max_length))
                axes.append(rel.axis)
                signs.append(1.0 if rel.subject_first else -1.0)
        self.batch_size = len(prompts)
        self.images = torch.tensor(images, dtype=torch.long)  # (R,)
        self.subject = torch.stack(subjects) if subjects else torch.zeros(0, max_length)  # (R, T)
        self.reference = torch.stack(references) if references else torch.zeros(0, max_length)  # (R, T)
        self.axes = torch.tensor(axes, dtype=torch.long)  # (R,)
        self.signs = torch.tensor(signs)  # (R,)

    @staticmethod
    def _weights(tokens: PromptTokens, words: tuple[int, ...], max_length: int) -> torch.Tensor:
        """(T,) equal weights on the tokens of `words`, summing to one."""
        weights = torch.zeros(max_length)
        indices = [i for w in words for i in tokens.token_indices(w)]
        weights[indices] = 1.0 / len(indices)
        return weights

    def __len__(self) -> int:
        return len(self.images)

    def loss(self, layers: list[torch.Tensor], margin: float) -> torch.Tensor:
        """(B,) per image: the sum over its relations of relu(margin - gap), averaged over layers."""
        total = 0.0
        for probs in layers:
            _, _, hw, t = probs.shape  # (B, heads, HW, T)
            size = math.isqrt(hw)
            # 1. Each side's map: head-mean attention of its tokens, normalised over the pixels.
            attention = probs.float().mean(dim=1)[self.images.to(probs.device)]  # (R, HW, T)
            subject = attention @ self.subject[:, :t, None].to(attention)  # (R, HW, 1)
            reference = attention @ self.reference[:, :t, None].to(attention)  # (R, HW, 1)
            # 2. Centroids along x and y, in image widths: (R, 2) each.
            cells = torch.arange(hw, device=probs.device)  # (HW,) row-major
            coords = (torch.stack([cells % size, cells // size], dim=-1).float() + 0.5) / size  # (HW, 2): x, y
            c_subject = (subject * coords).sum(1) / subject.sum(1).clamp(min=1e-8)  # (R, 2)
            c_reference = (reference * coords).sum(1) / reference.sum(1).clamp(min=1e-8)  # (R, 2)
            # 3. The gap in the stated direction along the stated axis, and its shortfall from the margin.
            axis = self.axes.to(probs.device)[:, None]
            gap = self.signs.to(attention)[:, None] * (c_reference - c_subject).gather(1, axis)  # (R, 1)
            shortfall = torch.relu(margin - gap[:, 0])  # (R,)
            per_image = torch.zeros(self.batch_size, device=probs.device).index_add(0, self.images.to(probs.device), shortfall)
            total = total + per_image
        return total / max(len(layers), 1)


class LayoutGuidance(SamplingHook):
    """A sampling hook that moves x_t at the first steps until the batch's stated relations hold.

    `follow`: (B,) the row whose step each row takes (an edit takes its source's, so that the two
    keep one x_t while their maps are one); None: each its own."""

    def __init__(
        self, targets: RelationTargets, strength: float, num_steps: int, until: float = UNTIL, margin: float = MARGIN,
        follow: torch.Tensor | None = None,
    ):
        self.targets, self.strength, self.margin, self.follow = targets, strength, margin, follow
        self.guided_steps = math.ceil(until * num_steps) if len(targets) > 0 and strength > 0 else 0

    def before_step(self, i: int, t: int, x: torch.Tensor, denoise: Denoise) -> torch.Tensor:
        return self.nudge(denoise, x) if i < self.guided_steps else x

    def nudge(self, denoise: Denoise, x: torch.Tensor) -> torch.Tensor:
        """x_t moved against the gradient of the relation loss; denoise(x, recorder) runs the UNet."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            capture = AttentionCapture()
            denoise(x, capture)
            loss = self.targets.loss(capture.layers, self.margin)  # (B,)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        # Per image, a step of `strength` in root-mean-square size (none where the loss is zero).
        rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()  # (B, 1, 1, 1)
        step = self.strength * grad / rms.clamp(min=1e-12)  # (B, C, S, S)
        if self.follow is not None:
            step = step[self.follow.to(step.device)]
        return (x - step).detach()
