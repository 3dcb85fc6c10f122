"""Layout guidance: relations read from the prompt, the loss on attention maps, and the sampler's nudge."""

import numpy as np
import pytest
import torch

from diffusion.sampling.settings import SamplerSettings
from diffusion.sampling.layout_guidance import MARGIN, AttentionCapture, LayoutGuidance, RelationTargets
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.text.prompt_tokens import PromptTokens, prompt_tokens


def red_circle_left_of_square(max_length=8):
    """PromptTokens of "red circle left of square", one token per word between start and end."""
    return PromptTokens(
        prompt="red circle left of square", tokens=["<start>", "red", "circle", "left", "of", "square", "<end>"],
        word_of_token=[None, 0, 1, 2, 3, 4, None], words=["red", "circle", "left", "of", "square"],
        start_token=0, end_token=6, num_padding=max_length - 7, dropped_words="",
    )


def column_attention(subject_column, reference_column, size=4, tokens=8):
    """(1, 1, HW, T) attention: "red circle" (tokens 1, 2) on one column of the map, "square" (token 5) on another."""
    probs = torch.full((1, 1, size, size, tokens), 1e-6)
    probs[0, 0, :, subject_column, 1:3] = 1.0
    probs[0, 0, :, reference_column, 5] = 1.0
    return probs.flatten(2, 3)


def test_the_loss_is_the_centroids_shortfall_from_the_margin():
    targets = RelationTargets([red_circle_left_of_square()], max_length=8)
    assert len(targets) == 1
    right_order = targets.loss([column_attention(0, 3)], MARGIN)  # subject in column 0, reference in column 3
    assert right_order.item() == pytest.approx(0.0, abs=1e-5)
    wrong_order = targets.loss([column_attention(3, 0)], MARGIN)
    # Centroids at 0.875 and 0.125 of the image width: the gap is -0.75, so the shortfall is margin + 0.75.
    assert wrong_order.item() == pytest.approx(MARGIN + 0.75, abs=1e-4)
    # Too close: columns 1 and 2 are 0.25 apart, which clears a margin of 0.15 but not one of 0.5.
    assert targets.loss([column_attention(1, 2)], 0.15).item() == pytest.approx(0.0, abs=1e-5)
    assert targets.loss([column_attention(1, 2)], 0.5).item() == pytest.approx(0.25, abs=1e-4)
    # Averaged over layers.
    both = targets.loss([column_attention(0, 3), column_attention(3, 0)], MARGIN)
    assert both.item() == pytest.approx((MARGIN + 0.75) / 2, abs=1e-4)


@pytest.fixture(scope="module")
def pipe(finished_run):
    return TextToImagePipeline.from_run(finished_run)


def test_a_nudge_lowers_the_relation_loss_and_leaves_prompts_without_relations_alone(pipe):
    prompts = ["a blue square left of a green star", "a red circle"]
    tokens = [prompt_tokens(pipe.tokenizer, p, pipe.encoder.max_length) for p in prompts]
    context, mask = pipe.encode(prompts)
    targets = RelationTargets(tokens, context.shape[1])
    assert targets.images.tolist() == [0]  # only the first prompt states a relation
    t = torch.tensor(900)

    def predict(x, capture):
        return pipe.unet(x, t.expand(len(x)), pipe.unet.condition(context, mask), recorder=capture)

    def loss_at(x):
        capture = AttentionCapture()
        with torch.no_grad():
            predict(x, capture)
        return targets.loss(capture.layers, margin=0.5)  # a wide margin: the loss is positive to start with

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    guidance = LayoutGuidance(targets, strength=0.05, num_steps=10, margin=0.5)
    nudged = guidance.nudge(predict, x)
    before, after = loss_at(x), loss_at(nudged)
    assert before[0] > 0 and after[0] < before[0]
    assert torch.equal(nudged[1], x[1])  # no relation: no gradient, no change
    assert (nudged[0] - x[0]).pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-3)  # a step of `strength`


def test_the_pipeline_guides_only_prompts_with_relations(pipe):
    prompts, seeds = ["a blue square left of a green star", "a red circle"], [0, 1]
    plain = pipe(prompts, seeds, settings=SamplerSettings(steps=4, layout_guidance=0.0)).images
    guided = pipe(prompts, seeds, settings=SamplerSettings(steps=4, layout_guidance=2.0)).images
    assert not np.array_equal(np.asarray(guided[0]), np.asarray(plain[0]))
    assert np.array_equal(np.asarray(guided[1]), np.asarray(plain[1]))


def test_a_callers_own_layout_guidance_hook_samples_as_the_pipelines_own(pipe):
    prompts, seeds = ["a blue square left of a green star", "a red circle"], [0, 1]
    own = pipe(prompts, seeds, settings=SamplerSettings(steps=4, layout_guidance=2.0)).images
    plain = SamplerSettings(steps=4, layout_guidance=0.0)
    hook = pipe.layout_guidance(prompts, strength=2.0, num_steps=4)
    assert hook.guided_steps == 1  # the first UNTIL of 4 steps
    callers = pipe(prompts, seeds, settings=plain, hooks=[hook]).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(own, callers))
    # Guiding every step (a sweep's --until 1) moves the image with relations further, and only that one.
    longer = pipe(prompts, seeds, settings=plain, hooks=[pipe.layout_guidance(prompts, 2.0, 4, until=1.0)]).images
    assert not np.array_equal(np.asarray(longer[0]), np.asarray(own[0]))
    assert np.array_equal(np.asarray(longer[1]), np.asarray(own[1]))
