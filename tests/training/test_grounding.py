"""The grounding loss: token -> object targets, the loss itself, and that training lowers it."""

from __future__ import annotations

import pytest
import torch

from diffusion.training.grounding import GroundingLoss, token_objects
from diffusion.training.objective import Grounding, Objective
from diffusion.text.tokenizer import train_clip_tokenizer
from diffusion.training.setup import build_unet
from conftest import tiny_config

CAPTION = "a small green star left of a large blue square"
WORD_OBJECTS = [0, 1, 1, 1, 0, 0, 0, 2, 2, 2]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    captions = [CAPTION, "a red circle above a purple triangle", "an orange circle"] * 4
    return train_clip_tokenizer(captions, tmp_path_factory.mktemp("tok"), 600, 24)


def test_token_objects_follow_the_words(tokenizer):
    targets = token_objects(tokenizer, CAPTION, WORD_OBJECTS, max_length=24)
    assert targets.shape == (24,)
    # <start> a small green star left of a large blue square <end> + padding
    assert targets[:12].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 2, 2, 2, 0]
    assert targets[12:].eq(0).all()


def test_a_word_of_several_tokens_grounds_them_all(tokenizer):
    caption = "a zebra circle"  # "zebra" is unseen, so it splits into several tokens
    targets = token_objects(tokenizer, caption, [0, 1, 1], max_length=24)
    pieces = len(tokenizer.tokenize("zebra"))
    assert pieces > 1
    assert targets[2 : 2 + pieces + 1].eq(1).all() and targets.eq(1).sum() == pieces + 1


def two_object_masks(size: int = 16) -> torch.Tensor:
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 2:6, 2:6] = 1  # object 1: a 4x4 square
    masks[0, 8:16, 8:16] = 2  # object 2: an 8x8 square
    return masks


def test_loss_is_zero_on_the_object_and_the_shortfall_elsewhere():
    masks = two_object_masks()
    targets = torch.tensor([[0, 1, 2, 0]])  # (B, T): token 1 names object 1, token 2 object 2
    on_objects = torch.zeros(1, 2, 256, 4)  # (B, heads, HW, T)
    on_objects[..., 0] = 1.0  # token 0 (no object) takes every pixel ...
    flat = masks.flatten(1)[0]
    on_objects[0, :, flat == 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # ... except object 1's, which token 1 takes
    on_objects[0, :, flat == 2] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    loss = GroundingLoss(targets, masks, int(masks.max()) + 1, weights=torch.ones(1))
    loss("layer", on_objects)
    assert loss.value().item() == pytest.approx(0.0, abs=1e-6)

    uniform = torch.full((1, 2, 256, 4), 0.25)
    loss = GroundingLoss(targets, masks, int(masks.max()) + 1, weights=torch.ones(1))
    loss("layer", uniform)
    areas = torch.tensor([16 / 256, 64 / 256])
    assert loss.value().item() == pytest.approx(((1 - areas) ** 2).mean().item(), rel=1e-5)

    noise_only = GroundingLoss(targets, masks, int(masks.max()) + 1, weights=torch.zeros(1))  # alpha_bar = 0: nothing to locate
    noise_only("layer", uniform)
    assert noise_only.value().item() == 0.0


def test_loss_pools_masks_to_each_layer_and_averages_layers():
    masks = two_object_masks()
    targets = torch.tensor([[0, 1, 2, 0]])
    loss = GroundingLoss(targets, masks, int(masks.max()) + 1, weights=torch.ones(1))
    loss("fine", torch.full((1, 1, 256, 4), 0.25))  # 16 x 16
    loss("coarse", torch.full((1, 1, 64, 4), 0.25))  # 8 x 8: masks area-pooled, same object areas
    assert set(loss.per_layer) == {"fine", "coarse"}
    assert loss.per_layer["fine"].item() == pytest.approx(loss.per_layer["coarse"].item(), rel=1e-5)


def two_object_batch(cache_dir, batch):
    """A tiny UNet, its training objective, and `batch` copies of two white objects on black with their
    masks (B, 16, 16) and random text states (B, 4, 8) whose tokens 1 and 2 name objects 1 and 2."""
    cfg = tiny_config(cache_dir)
    torch.manual_seed(0)
    unet = build_unet(cfg, context_dim=8)
    masks = two_object_masks().expand(batch, -1, -1).clone()  # (B, 16, 16)
    images = torch.where(masks[:, None] > 0, 1.0, -1.0).expand(-1, 3, -1, -1).clone()  # objects white on black
    context, context_mask = torch.randn(batch, 4, 8), torch.ones(batch, 4, dtype=torch.bool)
    token_ids = torch.tensor([[0, 1, 2, 0]] * batch)
    return unet, Objective(cfg.train, unet), images, masks, context, context_mask, token_ids


def test_training_on_the_grounding_loss_moves_attention_onto_the_objects(cache_dir):
    unet, objective, images, masks, context, context_mask, token_ids = two_object_batch(cache_dir, 4)
    grounding = Grounding(token_ids, masks, int(masks.max()) + 1)

    def fixed_terms():
        torch.manual_seed(123)  # the same timesteps and noise every time
        return objective(unet, images, context, context_mask, grounding)

    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    before = fixed_terms().grounding.item()
    for _ in range(20):
        optimizer.zero_grad()
        terms = fixed_terms()
        (terms.diffusion + terms.grounding).backward()
        optimizer.step()
    assert fixed_terms().grounding.item() < 0.7 * before


def test_coverage_term_asks_for_the_whole_object_not_one_pixel():
    masks = two_object_masks()
    targets = torch.tensor([[0, 1, 0]])  # token 1 names object 1 (16 pixels)
    flat = masks.flatten(1)[0]
    one_pixel = torch.zeros(1, 1, 256, 3)
    one_pixel[..., 0] = 1.0
    first = (flat == 1).nonzero()[0, 0]
    one_pixel[0, 0, first] = torch.tensor([0.0, 1.0, 0.0])  # token 1 takes one pixel of its object
    whole = torch.zeros(1, 1, 256, 3)
    whole[..., 0] = 1.0
    whole[0, 0, flat == 1] = torch.tensor([0.0, 1.0, 0.0])  # token 1 takes every pixel of its object

    def loss(probs, coverage):
        recorder = GroundingLoss(targets, masks, int(masks.max()) + 1, weights=torch.ones(1), coverage=coverage)
        recorder("layer", probs)
        return recorder.value().item()

    assert loss(one_pixel, 0.0) == pytest.approx(0.0, abs=1e-6)  # all of its attention is inside ...
    assert loss(one_pixel, 1.0) == pytest.approx(15 / 16, rel=1e-5)  # ... but 15 of 16 pixels lack it
    assert loss(whole, 1.0) == pytest.approx(0.0, abs=1e-6)


def test_object_centres_are_the_centres_of_the_masks():
    from diffusion.training.grounding import object_centres

    masks = two_object_masks(16)  # object 1 in rows/columns 2-5, object 2 in 8-15
    coords = torch.linspace(-1, 1, 16)
    centres, known = object_centres(masks, torch.tensor([[0, 1, 1, 2, 0]]), int(masks.max()) + 1)  # (1, 5, 2), (1, 5)
    assert known.tolist() == [[False, True, True, True, False]]
    first, second = coords[2:6].mean().item(), coords[8:16].mean().item()
    assert centres[0, 1].tolist() == pytest.approx([first, first])
    assert centres[0, 3].tolist() == pytest.approx([second, second])


def test_the_placer_reads_a_later_word_to_place_an_earlier_one():
    """'A left of B' and 'A right of B': A's side is told only by a word after it (a causal tower cannot)."""
    from diffusion.model.text_placer import TextPlacer

    torch.manual_seed(0)
    a, left, right, b = torch.randn(4, 16)
    context = torch.stack([torch.stack([a, left, b]), torch.stack([a, right, b])])  # (2, 3, 16)
    target_x = torch.tensor([[-0.5, 0.0, 0.5], [0.5, 0.0, -0.5]])  # A left then right; the relation word has no object
    placer = TextPlacer(16, num_layers=1, width=16, head_dim=8)
    optimizer = torch.optim.Adam(placer.parameters(), lr=3e-3)
    for _ in range(200):
        optimizer.zero_grad()
        x = placer.centres(context, None)[..., 0, 0]  # (2, 3): the one layout's x
        ((x - target_x)[:, [0, 2]] ** 2).mean().backward()
        optimizer.step()
    x = placer.centres(context, None)[..., 0, 0]
    assert x[0, 0] < -0.3 and x[1, 0] > 0.3  # A: left when "left" follows it, right when "right" does
    assert x[0, 2] > 0.3 and x[1, 2] < -0.3


def test_the_place_loss_trains_the_placer_and_leaves_the_text_states_alone(cache_dir):
    torch.manual_seed(0)
    cfg = tiny_config(cache_dir, "unet.text_place_layers=1")
    unet = build_unet(cfg, context_dim=8)
    context = torch.randn(1, 5, 8, requires_grad=True)
    grounding = Grounding(torch.tensor([[0, 1, 1, 2, 0]]), two_object_masks(16), 3)
    loss, layout, _ = Objective(cfg.train, unet).place_loss(context, torch.ones(1, 5, dtype=torch.bool), grounding)
    loss.backward()
    assert loss > 0 and context.grad is None
    assert unet.placer.to_centre.weight.grad.abs().sum() > 0
    assert layout.shape == (1,) and 0 <= int(layout) < unet.config.text_place_layouts


def test_each_image_follows_the_proposed_layout_nearest_its_masks():
    from diffusion.model.text_placer import choose_layouts, layout_errors

    target = torch.tensor([[[-0.5, 0.0], [0.5, 0.0], [0.0, 0.0]]]).repeat(2, 1, 1)  # (2, 3, 2); token 2 has no object
    known = torch.tensor([[True, True, False], [False, False, False]])
    mirrored, right = target.clone(), target.clone()
    mirrored[:, :2, 0] *= -1  # the two objects swapped
    right[:, 2] = 0.9  # the right layout, but for the token without an object
    centres = torch.stack([mirrored, right], dim=2)  # (2, 3, K=2, 2)
    errors = layout_errors(centres, target, known)  # (2, 2)
    assert errors[0].tolist() == pytest.approx([1.0, 0.0])  # the object-less token does not count
    generator = torch.Generator().manual_seed(0)
    chosen = torch.stack([choose_layouts(errors, known, generator) for _ in range(20)])  # (20, 2)
    assert (chosen[:, 0] == 1).all()  # the layout that matches the masks
    assert set(chosen[:, 1].tolist()) == {0, 1}  # no object known: a random layout


def test_several_layouts_learn_the_layouts_a_prompt_leaves_open():
    """One prompt, two equally likely scenes (A left of B, or A right of B): one layout per prompt
    learns their mean, A and B on one spot; two layouts, winner takes all, learn both scenes."""
    from diffusion.model.text_placer import TextPlacer, choose_layouts, layout_errors
    from diffusion.training.objective import LOSER_WEIGHT

    torch.manual_seed(0)
    context = torch.randn(1, 2, 16).repeat(8, 1, 1)  # (8, 2, 16): the same two-token prompt eight times
    scenes = torch.tensor([[[-0.5, 0.0], [0.5, 0.0]], [[0.5, 0.0], [-0.5, 0.0]]])  # (2 scenes, 2 tokens, 2)
    target = scenes[torch.arange(8) % 2]  # (8, 2, 2)
    known = torch.ones(8, 2, dtype=torch.bool)
    found = {}
    for layouts in (1, 2):
        placer = TextPlacer(16, num_layers=1, width=16, head_dim=8, layouts=layouts)
        optimizer = torch.optim.Adam(placer.parameters(), lr=1e-2)
        for _ in range(300):
            optimizer.zero_grad()
            errors = layout_errors(placer.centres(context, None), target, known)  # (8, K)
            nearest = errors.gather(1, choose_layouts(errors.detach(), known)[:, None])[:, 0]
            ((1 - LOSER_WEIGHT) * nearest + LOSER_WEIGHT * errors.mean(1)).mean().backward()
            optimizer.step()
        found[layouts] = placer.centres(context[:1], None)[0].detach()  # (2 tokens, K, 2)
    gap = lambda layout: (found[layout[0]][0, layout[1]] - found[layout[0]][1, layout[1]]).norm().item()
    assert gap((1, 0)) < 0.2  # the mean: both objects on one spot
    assert gap((2, 0)) > 0.8 and gap((2, 1)) > 0.8  # each layout a whole scene, the objects apart
    assert found[2][0, 0, 0] * found[2][0, 1, 0] < 0  # A on the left in one, on the right in the other



def test_the_placer_adds_its_code_and_sends_no_gradient_through_its_reading():
    """The states reach the cross-attention unchanged but for the code; no gradient reaches them through the placer."""
    from diffusion.model.text_placer import TextPlacer

    torch.manual_seed(0)
    placer = TextPlacer(16, num_layers=1, width=16, head_dim=8)
    torch.nn.init.normal_(placer.from_centre.weight)
    states = torch.randn(2, 3, 16, requires_grad=True)  # (B, T, 2D): last state | input embedding
    out = placer(states, None)
    assert not torch.allclose(out, states)
    out.sum().backward()
    assert torch.equal(states.grad, torch.ones_like(states))  # only the identity path carries gradient
    assert placer.from_centre.weight.grad.abs().sum() > 0
