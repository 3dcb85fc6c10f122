"""Aggregating attention over heads, steps and layers, checked on synthetic probabilities."""

import pytest
import torch
import torch.nn.functional as F

from diffusion.maps.aggregate import AttentionAggregator, MapSettings


def probs(batch, heads, side, tokens, seed):
    """(batch, heads, side*side, tokens) rows that sum to one over the tokens."""
    return torch.rand(batch, heads, side * side, tokens, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def as_maps(p, b):
    """The conditional rows' head mean as images: (b, T, side, side)."""
    mean = p[:b].mean(1)  # (b, HW, T)
    side = int(mean.shape[1] ** 0.5)
    return mean.transpose(1, 2).reshape(b, -1, side, side)


def test_maps_are_the_mean_over_heads_and_steps_per_layer_then_over_layers():
    b, tokens = 2, 3
    steps = [{"fine": probs(2 * b, 2, 4, tokens, seed=s), "coarse": probs(2 * b, 2, 2, tokens, seed=10 + s)} for s in range(3)]
    aggregator = AttentionAggregator(b, 4, MapSettings(upsample_mode="nearest"))
    for i, layers in enumerate(steps):
        record = aggregator.recorder(i, 999 - i)
        for name, p in layers.items():
            record(name, p)
        aggregator.after_step(i, 999 - i, torch.zeros(b, 3, 4, 4))
    maps = aggregator.result()
    fine = torch.stack([as_maps(s["fine"], b) for s in steps]).mean(0)  # (b, T, 4, 4)
    coarse = F.interpolate(torch.stack([as_maps(s["coarse"], b) for s in steps]).mean(0), size=(4, 4), mode="nearest")
    torch.testing.assert_close(maps.layers["fine"], fine)
    torch.testing.assert_close(maps.layers["coarse"], coarse)
    torch.testing.assert_close(maps.global_map, (fine + coarse) / 2)
    assert maps.steps_aggregated == [999, 998, 997]


def test_a_timestep_window_skips_the_steps_outside_it_and_snapshots_keep_the_running_map():
    b = 1
    aggregator = AttentionAggregator(b, 2, MapSettings(timestep_range=(0, 500), snapshot_every=1, keep_layers=False))
    recorded = []
    for i, t in enumerate([900, 400, 100]):
        record = aggregator.recorder(i, t)
        if record is not None:
            p = probs(2 * b, 1, 2, 2, seed=i)
            record("only", p)
            recorded.append(as_maps(p, b))
        aggregator.after_step(i, t, torch.full((b, 3, 2, 2), float(i)))
    maps = aggregator.result()
    assert aggregator.recorder(3, 600) is None and maps.steps_aggregated == [400, 100]
    torch.testing.assert_close(maps.global_map, torch.stack(recorded).mean(0))
    torch.testing.assert_close(maps.snapshots[1], recorded[0])  # after the first step inside the window
    assert 0 not in maps.snapshots and maps.layers == {}
    assert sorted(maps.denoised) == [1, 2] and maps.denoised[2].eq(1).all()  # each snapshot's x_0 estimate, clamped


def test_no_step_in_the_window_is_an_error():
    aggregator = AttentionAggregator(1, 2, MapSettings(timestep_range=(0, 10)))
    assert aggregator.recorder(0, 500) is None
    with pytest.raises(RuntimeError, match="excluded every step"):
        aggregator.result()


def test_the_aggregator_observes_and_never_moves_the_noisy_image():
    """A sampling hook by its methods alone (maps/ stands below sampling/: tests/test_layers.py)."""
    x = torch.randn(1, 3, 2, 2)
    assert AttentionAggregator(1, 2).before_step(0, 999, x, denoise=None) is x  # it observes, never moves x_t
