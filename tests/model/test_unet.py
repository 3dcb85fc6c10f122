"""The hand-written UNet and its attention layers, on tiny random inputs."""

import pytest
import torch

from diffusion.model.attention import CrossAttention, SelfAttention, attention
from diffusion.model.unet import UNet, end_token_states

from conftest import unet_args

# A tiny UNet with cross-attention only: no pooled text, feed-forward or text placer unless a test asks.
TINY = unet_args(
    16, 24, base_channels=16, channel_mults=[1, 2], num_res_blocks=1, cross_attention_resolutions=[16, 8],
    self_attention_resolutions=[8], head_dim=8, norm_groups=4, ff_mult=0, pooled_text=False, text_place_layers=0,
)


def run(unet, x, t, context, mask, recorder=None):
    return unet(x, t, unet.condition(context, mask), recorder=recorder)


def random_inputs(batch=3, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, 24, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 4:] = False  # padding in the first row
    mask[1, 2:] = False
    return x, t, context, mask


def trained_like_unet(seed=0, **changes):
    """A UNet whose zero-initialised outputs are perturbed, so every path affects the result."""
    torch.manual_seed(seed)
    unet = UNet(**{**TINY, **changes})
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def test_output_shape_and_zero_init():
    unet = UNet(**TINY)
    x, t, context, mask = random_inputs()
    out = run(unet, x, t, context, mask)
    assert out.shape == x.shape
    # The output convolution starts at zero, so the untrained model predicts exactly zero.
    assert torch.count_nonzero(out) == 0


def test_attention_paths_agree():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 10, [True] * 4 + [False] * 6])
    fast, none = attention(q, k, v, mask)
    explicit, probs = attention(q, k, v, mask, control=lambda probs: None)
    assert none is None
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 3, 10, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 10))
    assert probs[1, :, :, 4:].abs().max() == 0  # padding tokens get no attention


def test_recording_changes_nothing_and_names_every_layer():
    unet = trained_like_unet()
    x, t, context, mask = random_inputs()
    recorded = {}

    def recorder(name, probs):
        recorded[name] = probs

    plain = run(unet, x, t, context, mask)
    with_maps = run(unet, x, t, context, mask, recorder=recorder)
    torch.testing.assert_close(plain, with_maps, atol=1e-5, rtol=1e-5)
    layers = unet.cross_attention_layers
    assert list(recorded) == list(layers)
    for name, probs in recorded.items():
        size = layers[name]
        module = unet.get_submodule(name)
        assert isinstance(module, CrossAttention) and module.layer_name == name
        assert probs.shape == (3, module.heads, size * size, 7)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        assert probs[0, :, :, 4:].max() == 0 and probs[1, :, :, 2:].max() == 0


def test_a_controller_returning_its_probabilities_changes_nothing_bit_for_bit():
    unet = trained_like_unet()
    x, t, context, mask = random_inputs()
    seen = []

    def read(name, probs):
        seen.append(name)

    def give_back_a_copy(name, probs):
        return probs.clone()

    read_only = run(unet, x, t, context, mask, recorder=read)
    both_copied = unet(x, t, unet.condition(context, mask), recorder=give_back_a_copy, self_recorder=give_back_a_copy)
    read_both = unet(x, t, unet.condition(context, mask), recorder=read, self_recorder=read)
    assert torch.equal(both_copied, read_both)
    assert torch.equal(run(unet, x, t, context, mask, recorder=give_back_a_copy), read_only)
    self_layers = [n for n, m in unet.named_modules() if isinstance(m, SelfAttention)]
    assert self_layers and set(self_layers) <= set(seen)  # self-attention layers report under their own names


def test_a_controller_replaces_what_the_layer_attends_with():
    unet = trained_like_unet()
    x, t, context, mask = random_inputs()

    def first_token_only(name, probs):
        replaced = torch.zeros_like(probs)
        replaced[..., 0] = 1.0  # every pixel reads only the start token
        return replaced

    plain = run(unet, x, t, context, mask)
    controlled = run(unet, x, t, context, mask, recorder=first_token_only)
    assert not torch.allclose(plain, controlled)
    # What the layers read is now the start token's value alone: the other tokens no longer matter
    # (TINY has no pooled text and no placer, which would read them outside the cross-attention).
    other_text = context.clone()
    other_text[:, 1:] = torch.randn_like(other_text[:, 1:])
    torch.testing.assert_close(run(unet, x, t, other_text, mask, recorder=first_token_only), controlled)
    assert not torch.allclose(run(unet, x, t, other_text, mask), plain)

def test_padding_tokens_do_not_affect_output():
    unet = trained_like_unet()
    x, t, context, mask = random_inputs()
    changed = context.clone()
    changed[0, 4:] += 100.0  # only the masked positions of row 0
    torch.testing.assert_close(run(unet, x, t, context, mask)[0], run(unet, x, t, changed, mask)[0])


def test_text_conditioning_reaches_the_output():
    unet = trained_like_unet()
    x, t, context, mask = random_inputs()
    other = context.clone()
    other[2, 0] += 1.0
    assert not torch.allclose(run(unet, x, t, context, mask)[2], run(unet, x, t, other, mask)[2])


def test_pooled_text_is_the_end_token_state():
    x, t, context, mask = random_inputs()
    assert torch.equal(end_token_states(context, mask), context[[0, 1, 2], [3, 1, 6]])  # last unmasked tokens
    # Without cross-attention the text can only enter through the pooled end token.
    unet = trained_like_unet(pooled_text=True, cross_attention_resolutions=())
    end_changed, first_changed = context.clone(), context.clone()
    end_changed[1, 1] += 1.0  # row 1's end token
    first_changed[1, 0] += 1.0  # row 1's start token
    base = run(unet, x, t, context, mask)
    assert not torch.allclose(base[1], run(unet, x, t, end_changed, mask)[1])
    torch.testing.assert_close(base, run(unet, x, t, first_changed, mask))


def test_save_load_round_trip(tmp_path):
    unet = trained_like_unet()
    unet.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "config.json").is_file()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UNet.from_pretrained(tmp_path / "unet").eval()
    x, t, context, mask = random_inputs()
    torch.testing.assert_close(run(unet, x, t, context, mask), run(loaded, x, t, context, mask), atol=0, rtol=0)
    assert loaded.cross_attention_layers == unet.cross_attention_layers


def test_missing_attention_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cross_attention_resolutions asks for \[4\].*choose from \[16, 8\]"):
        UNet(**{**TINY, "cross_attention_resolutions": (4,)})
