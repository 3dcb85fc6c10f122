"""The sampling loop on a tiny random UNet: guidance, per-image seeds, and the per-step hooks."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffusion.maps.aggregate import AttentionAggregator, MapSettings
from diffusion.model.unet import UNet
from diffusion.sampling.loop import OnStep, SamplingHook, guide, sample

from conftest import unet_args

# A tiny UNet with cross-attention only (no pooled text, feed-forward or text placer unless asked).
TINY = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, cross_attention_resolutions=[8, 4],
            self_attention_resolutions=[], head_dim=8, norm_groups=4, ff_mult=0, pooled_text=False, text_place_layers=0)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet(**unet_args(8, 16, **TINY))
    with torch.no_grad():  # perturb the zero-initialised outputs so that the text reaches the image
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def text(batch=2, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    context, null = torch.randn(batch, tokens, 16, generator=g), torch.randn(1, tokens, 16, generator=g)
    return context, torch.ones(batch, tokens, dtype=torch.bool), null, torch.ones(1, tokens, dtype=torch.bool)


def run(unet, seeds=(0, 1), hooks=(), guidance=3.0, scheduler=None, steps=4, batch_text=None):
    context, mask, null, null_mask = batch_text or text(len(seeds))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return sample(unet, scheduler or DDPMScheduler(), context, mask, null, null_mask, generators, steps, guidance, hooks)


class Log(SamplingHook):
    def __init__(self):
        self.calls = []
        self.denoised = []  # each step's x_0 estimate

    def before_step(self, i, t, x, denoise):
        self.calls.append(("before", i, t))
        return x

    def recorder(self, i, t):
        self.calls.append(("recorder", i, t))
        return lambda name, probs: self.calls.append(("probs", name, probs.shape[0]))

    def after_step(self, i, t, denoised):
        self.calls.append(("after", i, t))
        self.denoised.append(denoised.clone())


def test_hooks_see_every_step_in_order_and_the_conditional_rows_come_first(unet):
    log = Log()
    run(unet, hooks=[log], steps=3)
    timesteps = DDPMScheduler()
    timesteps.set_timesteps(3)
    for i, t in enumerate(timesteps.timesteps.tolist()):
        at_step = [c for c in log.calls if c[0] != "probs" and c[1] == i]
        assert at_step == [("before", i, t), ("recorder", i, t), ("after", i, t)]
    # Every cross-attention layer at every step sees the guided batch: 2 prompts + 2 unconditional rows.
    assert [c[2] for c in log.calls if c[0] == "probs"] == [4] * (len(unet.cross_attention_layers) * 3)


@pytest.mark.parametrize("scheduler", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_hooks_see_each_steps_estimate_of_the_clean_image_and_the_last_one_is_the_image(unet, scheduler):
    log = Log()
    image = run(unet, hooks=[log], scheduler=scheduler(), steps=4)
    assert [d.shape for d in log.denoised] == [image.shape] * 4  # the prompts' rows only
    torch.testing.assert_close(log.denoised[-1].clamp(-1, 1), image, atol=1e-4, rtol=1e-4)
    assert (log.denoised[0] - image).abs().mean() > 1e-3  # the first estimate is still far off


def test_a_hook_that_moves_x_changes_the_image_and_a_quiet_one_does_not(unet):
    plain = run(unet)
    assert torch.equal(run(unet, hooks=[SamplingHook(), OnStep(lambda i, t: None)]), plain)

    class Push(SamplingHook):
        def before_step(self, i, t, x, denoise):
            assert denoise(x, lambda name, probs: None).shape == x.shape  # the conditional pass, B rows
            return x + 0.1 if i == 0 else x

    assert not torch.equal(run(unet, hooks=[Push()]), plain)


def test_each_image_regenerates_alone_from_its_seed(unet):
    context, mask, null, null_mask = text(2)
    both = run(unet, seeds=(0, 1), batch_text=(context, mask, null, null_mask))
    second = run(unet, seeds=(1,), batch_text=(context[1:], mask[1:], null, null_mask))
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)
    assert both.shape == (2, 3, 8, 8) and both.abs().max() <= 1


def test_guidance_one_is_the_conditional_model_alone(unet):
    cond, uncond = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(guide(cond, uncond, 1.0), cond)  # (to rounding; the loop skips it at 1)
    log = Log()
    run(unet, hooks=[log], guidance=1.0, scheduler=DDIMScheduler(), steps=2)
    assert {c[2] for c in log.calls if c[0] == "probs"} == {2}  # no unconditional rows at all


def test_the_aggregator_hook_records_the_conditional_rows_at_the_image_size(unet):
    aggregator = AttentionAggregator(2, 8, MapSettings(snapshot_every=2))
    run(unet, hooks=[aggregator], steps=4)
    maps = aggregator.result()
    assert maps.global_map.shape == (2, 5, 8, 8) and set(maps.layers) == set(unet.cross_attention_layers)
    torch.testing.assert_close(maps.global_map.sum(1), torch.ones(2, 8, 8))  # each pixel's tokens sum to one
    assert sorted(maps.snapshots) == [1, 3] and len(maps.steps_aggregated) == 4
    assert sorted(maps.denoised) == [1, 3] and maps.denoised[1].shape == (2, 3, 8, 8)


def test_each_seed_draws_its_own_layout_and_the_image_follows_it():
    from diffusion.sampling.loop import seed_layouts

    layouts = seed_layouts(range(64), 4)  # (64,)
    assert set(layouts.tolist()) == {0, 1, 2, 3}  # every proposed layout is drawn
    assert seed_layouts([5, 2], 4).tolist() == [int(seed_layouts([5], 4)[0]), int(seed_layouts([2], 4)[0])]  # per seed, not per batch
    torch.manual_seed(0)
    placed = UNet(**unet_args(8, 16, **{**TINY, "text_place_layers": 1, "text_place_width": 8, "text_place_layouts": 2}))
    with torch.no_grad():
        for p in placed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    context, mask, null, null_mask = text(1)
    images = [
        sample(placed.eval(), DDPMScheduler(), context, mask, null, null_mask, [torch.Generator().manual_seed(0)], 2, 3.0,
               layouts=torch.tensor([k]))
        for k in (0, 1, 1)
    ]
    assert not torch.allclose(images[0], images[1]) and torch.equal(images[1], images[2])
