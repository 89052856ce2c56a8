"""attacks.metrics and attacks.leakage: pinned SSIM/PSNR values, Hungarian matching, leak flags."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attacks.leakage import (
    MIN_DISTRACTORS,
    chance_summary,
    leak_flags,
    leakage_curve,
    leakage_rate,
    ssim_cutoff_curve,
)
from attacks.metrics import (
    PSNR_CAP_DB,
    match_reconstructions,
    pairwise_ssim,
    psnr,
    ssim,
    to_unit,
)
from attacks.runtime import torch_threads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (the value range splitfl feeds models)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 7, 7, generator=gen)
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x * 2 - 1


def test_identical_images_give_ssim_one_and_capped_psnr():
    x = _images(3)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    assert torch.equal(psnr(x, x), torch.full((3,), PSNR_CAP_DB))


def test_known_values_on_constant_images():
    # In [0, 1]: 0.5 vs 0.6. PSNR = 10 log10(1 / 0.01) = 20 dB. SSIM has no
    # contrast/structure term for flat images: (2*0.5*0.6 + C1) / (0.5^2 + 0.6^2 + C1), C1 = 0.01^2.
    a, b = torch.full((1, 1, 28, 28), 0.5), torch.full((1, 1, 28, 28), 0.6)
    assert psnr(a, b, value_range=(0.0, 1.0)).item() == pytest.approx(20.0, abs=1e-4)
    c1 = 0.01**2
    assert ssim(a, b, value_range=(0.0, 1.0)).item() == pytest.approx((0.6 + c1) / (0.61 + c1), abs=1e-5)


def test_value_range_mapping_and_clamp():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    assert to_unit(x).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]
    # the same pair scores the same whichever range it is expressed in
    a, b = _images(2, 1), _images(2, 2)
    assert torch.allclose(ssim(a, b), ssim((a + 1) / 2, (b + 1) / 2, value_range=(0, 1)), atol=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(_images(2), _images(3))


def test_hungarian_recovers_a_shuffled_permutation():
    originals = _images(6)
    gen = torch.Generator().manual_seed(3)
    shuffle = torch.randperm(6, generator=gen)
    recs = (originals + 0.05 * torch.randn(originals.shape, generator=gen))[shuffle]
    result = match_reconstructions(recs, originals)
    assert torch.equal(shuffle[result.perm], torch.arange(6))
    assert torch.allclose(result.ssim, ssim(recs[result.perm], originals))
    assert (result.ssim > 0.5).all() and result.psnr.shape == (6,)
    assert pairwise_ssim(recs, originals).shape == (6, 6)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 28), (1, 12, 12), (3, 9, 11)])
def test_pairwise_ssim_is_the_pinned_ssim_of_every_pair(shape):
    """The separable fast path equals torchmetrics' SSIM pair by pair (float32 rounding), out-of-range values too."""
    gen = torch.Generator().manual_seed(5)
    a = torch.rand((5, *shape), generator=gen) * 2.4 - 1.2
    b = torch.cat([a[:2] + 0.1 * torch.randn((2, *shape), generator=gen), torch.rand((4, *shape), generator=gen) * 2 - 1])
    ia, ib = torch.meshgrid(torch.arange(len(a)), torch.arange(len(b)), indexing="ij")
    slow = ssim(a[ia.reshape(-1)], b[ib.reshape(-1)]).reshape(len(a), len(b))
    fast = pairwise_ssim(a, b, chunk=7)  # chunks that do not divide the pairs
    assert fast.shape == (5, 6)
    assert torch.allclose(fast, slow, atol=1e-4), float((fast - slow).abs().max())
    assert pairwise_ssim(a[:0], b).shape == (0, 6)


# --------------------------------------------------------------------------- leakage

def _pool(n_targets: int = 4, n_distractors: int = MIN_DISTRACTORS):
    x = _images(n_targets + n_distractors, seed=7)
    return x[:n_targets], x[n_targets:]


def test_mean_image_is_never_leaked():
    targets, distractors = _pool()
    mean = distractors.mean(dim=0)
    details = leak_flags(mean.expand_as(targets).clone(), targets, distractors)
    assert not details.leaked.any()
    assert torch.allclose(details.gain, torch.zeros(4), atol=1e-5)


def test_exact_copy_is_leaked_and_noisy_copy_above_margin_is_leaked():
    targets, distractors = _pool()
    exact = leak_flags(targets.clone(), targets, distractors)
    assert exact.leaked.all() and exact.rate == 1.0
    noisy = targets + 0.05 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(0))
    details = leak_flags(noisy, targets, distractors)
    assert (details.gain >= 0.1).all() and details.reidentified.all() and details.rate == 1.0
    assert leakage_rate(noisy.flip(0), targets, distractors, match=True) == 1.0


def test_reconstruction_matching_a_distractor_is_not_reidentified():
    targets, distractors = _pool()
    details = leak_flags(distractors[:4].clone(), targets, distractors)
    assert not details.reidentified.any() and details.rate == 0.0
    assert (details.nearest == torch.arange(4, 8)).all()


def test_curves_are_monotone_and_cutoff_counts_the_mean_image():
    targets, distractors = _pool()
    mean = distractors.mean(dim=0).expand_as(targets).clone()
    details = leak_flags(mean, targets, distractors)
    margins = [0.0, 0.05, 0.1, 0.3]
    rates = [r for _, r in leakage_curve(details, margins)]
    assert rates == sorted(rates, reverse=True) and rates[-1] == 0.0
    cut = ssim_cutoff_curve(details, [-1.0, 2.0])
    assert cut == [(-1.0, 1.0), (2.0, 0.0)]


def test_chance_level_matches_an_attack_that_knows_no_identity():
    """An 'attack' that outputs a random pool image (sharp, but unrelated to the target) is counted as leaked
    exactly when it happens to draw the target: 1 / len(pool) per image, which is what chance_i says."""
    targets, distractors = _pool()
    pool = torch.cat([targets, distractors])
    gen = torch.Generator().manual_seed(3)
    hits, chance = 0, []
    for _ in range(50):
        rec = pool[torch.randint(len(pool), (len(targets),), generator=gen)]
        details = leak_flags(rec, targets, distractors)
        hits += int(details.leaked.sum())
        chance += details.chance.tolist()
    assert np.allclose(chance, 1 / len(pool))  # a copy of a pool image beats the mean image over its neighbour
    expected = len(chance) / len(pool)  # 200 draws / 104 images: about 1.9 hits
    assert hits <= 8, f"{hits} chance hits, {expected:.1f} expected"
    mean = distractors.mean(dim=0).expand_as(targets).clone()
    assert (leak_flags(mean, targets, distractors).chance == 0).all()  # the mean image beats no one by the margin


def test_chance_summary_is_the_exact_binomial_tail():
    from scipy.stats import binom

    s = chance_summary([0.01] * 64, leaked=1)
    assert s["chance_leakage_rate"] == pytest.approx(0.01)
    assert s["chance_p_value"] == pytest.approx(binom.sf(0, 64, 0.01))
    assert chance_summary([0.01] * 64, leaked=3)["chance_p_value"] == pytest.approx(binom.sf(2, 64, 0.01))
    assert chance_summary([0.5, 0.0], leaked=0) == {"chance_leakage_rate": 0.25, "chance_p_value": 1.0}
    assert chance_summary([0.0, 0.0], leaked=1)["chance_p_value"] == 0.0  # a leak no luck explains


def test_small_pool_and_shape_errors():
    targets, distractors = _pool(n_distractors=MIN_DISTRACTORS - 1)
    with pytest.raises(ValueError, match="at least 100 distractor"):
        leak_flags(targets, targets, distractors)
    targets, distractors = _pool()
    with pytest.raises(ValueError, match="same shape"):
        leak_flags(targets[:3], targets, distractors)
    with pytest.raises(ValueError, match="distractors must be"):
        leak_flags(targets, targets, distractors[:, :, :20])


@pytest.mark.realdata
def test_mean_image_scores_high_ssim_on_pneumoniamnist(medmnist_dir):
    path = medmnist_dir / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with np.load(path) as npz:
        train, test = npz["train_images"], npz["test_images"][:200]
    mean = torch.from_numpy(train.astype(np.float32).mean(axis=0) / 255.0)[None, None]
    target = torch.from_numpy(test.astype(np.float32) / 255.0)[:, None]
    scores = ssim(mean.expand_as(target), target, value_range=(0, 1))
    assert math.isfinite(scores.mean().item()) and scores.mean().item() > 0.4  # README quotes the measured figure
