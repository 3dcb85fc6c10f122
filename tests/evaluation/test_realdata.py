"""The real-data measures on synthetic embeddings: R-precision, KID and the candidate captions."""

import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.evaluation.realdata import CANDIDATES, blurred, candidate_sets, kid, r_precision


def unit(n, d=16, seed=0, shift=0.0):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += shift
    return F.normalize(x, dim=-1)


def test_candidates_hold_the_own_caption_first_and_99_others():
    candidates = candidate_sets([0, 7, 149], pool_size=150)
    assert candidates.shape == (3, CANDIDATES) and candidates[:, 0].tolist() == [0, 7, 149]
    for row in candidates:
        assert len(set(row.tolist())) == CANDIDATES and row.max() < 150


def test_r_precision_counts_images_whose_own_caption_wins():
    captions = unit(150)
    candidates = candidate_sets(list(range(10)), 150)
    assert r_precision(captions[:10], captions, candidates) == 1.0  # each image is its caption's own embedding
    wrong = captions[candidates[:, 1]]  # each image is another candidate's caption
    assert r_precision(wrong, captions, candidates) == 0.0
    half = torch.cat([captions[:5], wrong[5:]])
    assert r_precision(half, captions, candidates) == 0.5


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    same = kid(unit(200, seed=1), unit(200, seed=2))[0]
    near, far = kid(unit(200, seed=1, shift=0.5), unit(200, seed=2))[0], kid(unit(200, seed=1, shift=3.0), unit(200, seed=2))[0]
    assert abs(same) < near < far


def test_kid_of_two_whole_sets_has_no_spread_and_subsets_of_larger_sets_do():
    whole = kid(unit(100, seed=1, shift=0.5), unit(100, seed=2))
    sampled = kid(unit(300, seed=1, shift=0.5), unit(100, seed=2))
    assert whole[1] == 0.0 and whole[0] > 0
    assert sampled[1] > 0


def test_blurring_keeps_the_colours_and_loses_the_edges():
    image = Image.new("RGB", (32, 32), "white")
    image.paste((255, 0, 0), (8, 8, 24, 24))
    soft = blurred(image)
    assert soft.getpixel((16, 16))[0] > 200 and 0 < soft.getpixel((16, 16))[1] < 255  # red, but mixed with the white
