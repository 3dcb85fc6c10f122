"""Does the model put the objects in the stated relation at the first denoising step?

Where a sampled image breaks its relation, either the model never knew the layout from the text,
or it knew it at the start and lost it along the way. At the first step (pure noise, t = T) the
prediction of the clean image is the model's mean image for the prompt: blurry, but its colours
already lie where the model thinks the objects go. For every two-object evaluation prompt
("a red circle left of a blue square") and several noise seeds, this script:

1. predicts the clean image x0 at the first step of the sampler (conditional only, and guided);
2. unmixes each pixel into the two named colours: (white - pixel) ~ a (white - colour A) +
   b (white - colour B), least squares, a and b clipped at 0;
3. takes the centroid of each colour's amount along the relation's axis and checks the order.

0.5 is chance; the sampled images' own relation accuracy is in the evaluation (python -m diffusion.evaluation).

    python bench/layout_probe.py --model outputs/runs/<run>/model-30min [--seeds 8] [--guidance 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from diffusion.data.vocabulary import BACKGROUND, PALETTE
from diffusion.evaluation.prompts import build_tasks
from diffusion.runs import find_model_dir, read_run_config, shapes_info
from diffusion.sampling.loop import guide, initial_noise, seed_layouts
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.settings import SamplerSettings
from diffusion.data.relations import RELATION_AXES


def colour_amounts(x0: torch.Tensor, colour_a: str, colour_b: str) -> torch.Tensor:
    """(3, S, S) image in [-1, 1] -> (2, S, S): how much of each named colour every pixel holds."""
    white = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None]  # (3, 1)
    basis = white - torch.tensor([PALETTE[colour_a], PALETTE[colour_b]], dtype=torch.float32).T  # (3, 2)
    pixels = white - (x0.float().flatten(1) + 1) * 127.5  # (3, S*S): distance from white
    amounts = torch.linalg.lstsq(basis, pixels).solution.clamp(min=0)  # (2, S*S)
    return amounts.view(2, *x0.shape[1:])


def ordered_correctly(amounts: torch.Tensor, relation: str) -> tuple[bool, float]:
    """Whether subject (row 0) and reference (row 1) centroids are in the relation's order; and the gap in px."""
    axis, subject_first = RELATION_AXES[relation]
    size = amounts.shape[-1]
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    along = amounts.sum(dim=1 + axis)  # (2, S): amounts (2, y, x) summed over y for x (axis 0), over x for y
    centres = (along * coords).sum(-1) / along.sum(-1).clamp(min=1e-6)  # (2,)
    gap = float(centres[1] - centres[0]) if subject_first else float(centres[0] - centres[1])
    return gap > 0, gap


@torch.no_grad()
def first_step_x0(pipe: TextToImagePipeline, prompts: list[str], seeds: list[int], guidance: float) -> torch.Tensor:
    """The sampler's first prediction of the clean image: (B, 3, S, S)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    scheduler.set_timesteps(25)
    t = scheduler.timesteps[0]
    size = unet.config.sample_size
    x = initial_noise([torch.Generator().manual_seed(s) for s in seeds], (3, size, size), "cpu") * scheduler.init_noise_sigma
    context, mask = pipe.encode(prompts)
    null, null_mask = pipe.encode([""] * len(prompts))
    layouts = seed_layouts(seeds, unet.config.text_place_layouts)  # (B,) the placer's layout of each seed, as the sampler draws it
    text = unet.condition(torch.cat([context, null]), torch.cat([mask, null_mask]), torch.cat([layouts, layouts]))
    out = unet(torch.cat([x, x]), t.expand(2 * len(prompts)), text)
    cond, uncond = out.chunk(2)
    guided = guide(cond, uncond, guidance)
    return scheduler.step(guided, t, x).pred_original_sample


def probe(pipe: TextToImagePipeline, prompts: list, seeds: int, guidance: float) -> tuple[float, float, int]:
    """(fraction in the right order, median gap in px, predictions) over the evaluation's spatial prompts."""
    gaps, correct = [], []
    for prompt in prompts:
        x0 = first_step_x0(pipe, [prompt.text] * seeds, list(range(seeds)), guidance)
        (relation,) = prompt.relations  # two-object prompts: one relation
        a, b = prompt.objects[relation.subject], prompt.objects[relation.reference]
        for image in x0:
            ok, gap = ordered_correctly(colour_amounts(image, a.colour, b.colour), relation.relation)
            correct.append(ok)
            gaps.append(gap)
    return sum(correct) / len(correct), statistics.median(gaps), len(correct)


def spatial_prompts(model: str) -> list:
    """The evaluation's two-object prompts for the model's dataset."""
    info, _ = shapes_info(read_run_config(find_model_dir(model)), find_model_dir(model))
    return next(task.prompts for task in build_tasks(info) if task.name == "spatial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=SamplerSettings().guidance)
    args = parser.parse_args()

    pipe, prompts = TextToImagePipeline.from_run(args.model), spatial_prompts(args.model)
    for scale in dict.fromkeys((1.0, args.guidance)):
        accuracy, gap, n = probe(pipe, prompts, args.seeds, scale)
        print(f"guidance {scale:g}: relation order right in {accuracy:.3f} of {n} first-step predictions, "
              f"median gap {gap:+.2f} px (positive: the right order)")


if __name__ == "__main__":
    main()
