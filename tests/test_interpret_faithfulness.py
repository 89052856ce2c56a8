"""interpret.faithfulness and interpret.agreement on a LeNet trained for seconds on an easy task.

The task: a bright Gaussian blob on a dark noisy background, class 1 if the
blob is in the left half, 0 if in the right. The evidence is local and
known, so a faithful map must beat random maps on deletion and insertion.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import spearmanr

import splitfl.models  # noqa: F401  (registers splitfl_lenet with timm)
from interpret.agreement import compare_maps, spearman_per_image, top_fraction_overlap
from interpret.attributions import attribute
from interpret.faithfulness import (
    deletion_insertion,
    gaussian_blur,
    infidelity_scores,
    randomisation_check,
    randomise_model,
    sensitivity_scores,
    target_probability,
)
from splitfl.models.factory import create_model


def blob_images(n: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], labels): label 1 = blob in the left half, 0 = right half."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    cx = torch.where(y == 1, torch.rand(n, generator=g) * 6 + 4, torch.rand(n, generator=g) * 6 + 18)
    cy = torch.rand(n, generator=g) * 18 + 5
    r = torch.arange(size, dtype=torch.float32)
    d2 = (r[None, None, :] - cx[:, None, None]) ** 2 + (r[None, :, None] - cy[:, None, None]) ** 2
    img = -0.8 + 0.1 * torch.randn(n, size, size, generator=g) + 1.7 * torch.exp(-d2 / 8.0)
    return img.clamp(-1, 1)[:, None], y


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("splitfl_lenet", 2, 1, img_size=28)
    x, y = blob_images(1024, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(100):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = blob_images(128, seed=3)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.95, f"the easy task did not train (accuracy {acc:.2f})"
    return model


@pytest.fixture(scope="module")
def batch(trained: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = blob_images(8, seed=4)
    with torch.no_grad():
        pred = trained(x).argmax(1)
    return x, pred


@pytest.fixture(scope="module")
def ig_maps(trained: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, pred = batch
    return attribute(trained, x, pred, "integrated_gradients")


# ---------------------------------------------------------------- deletion / insertion


def test_ig_beats_random_on_deletion_and_insertion(trained, batch, ig_maps) -> None:
    x, pred = batch
    res = deletion_insertion(trained, x, pred, ig_maps, insertion_start="baseline", n_random=3)
    s = res["summary"]
    assert s["deletion_auc"] < s["random_deletion_auc"] - 0.2, s
    assert s["insertion_auc"] > s["random_insertion_auc"] + 0.05, s
    assert s["deletion_beats_random"] >= 0.75 and s["insertion_beats_random"] >= 0.75, s
    for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
        assert res[key].shape == (8,) and np.all((res[key] >= 0) & (res[key] <= 1))


def test_gradcam_beats_random_on_deletion(trained, batch) -> None:
    x, pred = batch
    maps = attribute(trained, x, pred, "gradcam")
    s = deletion_insertion(trained, x, pred, maps, n_random=2)["summary"]
    assert s["deletion_auc"] < s["random_deletion_auc"] - 0.1, s


def test_a_flat_map_scores_like_a_random_map_not_like_raster_order(trained, batch) -> None:
    """Ties are broken at random: an all-zero map (e.g. a ReLU'd Grad-CAM) carries no ranking."""
    x, pred = batch
    flat = deletion_insertion(trained, x, pred, torch.zeros(x.shape[0], 28, 28), n_random=4, seed=1)
    # raster order (what a stable sort of equal values gives) deletes the top rows first
    raster = torch.arange(28 * 28, 0, -1, dtype=torch.float32).view(1, 28, 28).expand(x.shape[0], -1, -1)
    ordered = deletion_insertion(trained, x, pred, raster, n_random=0)
    gap = abs(flat["summary"]["deletion_auc"] - flat["summary"]["random_deletion_auc"])
    assert gap < 0.1, flat["summary"]  # one random draw against the mean of four, on 8 images
    assert not np.allclose(flat["deletion_curve"], ordered["deletion_curve"], atol=1e-3)


def test_curve_endpoints_are_the_model_itself(trained, batch, ig_maps) -> None:
    """Step 0 of deletion and the last step of insertion are the untouched image; the ends are the start images."""
    x, pred = batch
    res = deletion_insertion(trained, x, pred, ig_maps, n_steps=5, n_random=1, batch_size=7)
    with torch.no_grad():
        p_x = torch.softmax(trained(x), 1).gather(1, pred[:, None]).squeeze(1).numpy()
        p_base = torch.softmax(trained(torch.zeros_like(x)), 1).gather(1, pred[:, None]).squeeze(1).numpy()
        p_blur = torch.softmax(trained(gaussian_blur(x)), 1).gather(1, pred[:, None]).squeeze(1).numpy()
    np.testing.assert_allclose(res["fractions"], np.linspace(0, 1, 6), atol=1e-7)
    assert res["deletion_curve"].shape == (8, 6)
    np.testing.assert_allclose(res["deletion_curve"][:, 0], p_x, atol=1e-5)
    np.testing.assert_allclose(res["insertion_curve"][:, -1], p_x, atol=1e-5)
    np.testing.assert_allclose(res["deletion_curve"][:, -1], p_base, atol=1e-5)
    np.testing.assert_allclose(res["insertion_curve"][:, 0], p_blur, atol=1e-5)
    np.testing.assert_allclose(res["deletion_auc"], np.trapezoid(res["deletion_curve"], res["fractions"], axis=1),
                               atol=1e-6)


def test_gaussian_blur_preserves_constants_and_smooths() -> None:
    flat = torch.full((1, 2, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat), flat)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    b = gaussian_blur(x)
    assert b.shape == x.shape and b.std() < 0.5 * x.std()


def test_target_probability() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([0, 1])
    torch.testing.assert_close(target_probability(logits, t, "binary"), torch.softmax(logits, 1)[[0, 1], [0, 1]])
    torch.testing.assert_close(target_probability(logits, t, "multilabel"), torch.sigmoid(torch.tensor([2.0, 1.0])))
    torch.testing.assert_close(target_probability(logits[:, :1], torch.tensor([0, 0])), torch.sigmoid(logits[:, 0]))
    with pytest.raises(ValueError, match="task_type"):
        target_probability(logits, t, "regression")


# ---------------------------------------------------------------- randomisation test


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam"])
def test_randomised_model_maps_are_dissimilar(trained, batch, ig_maps, method: str) -> None:
    x, pred = batch
    maps = ig_maps if method == "integrated_gradients" else None
    res = randomisation_check(trained, x, pred, method, maps=maps, seed=0)
    assert res["randomised_maps"].shape == (8, 28, 28)
    assert res["n_undefined"] < 8
    assert res["mean_abs_spearman"] < 0.5, res["spearman"]
    same = compare_maps(res["maps"].abs(), res["maps"].abs())
    np.testing.assert_allclose(same["spearman"][~np.isnan(same["spearman"])], 1.0)


def test_flat_randomised_gradcam_counts_as_dissimilar() -> None:
    """A re-initialised vit_tiny's Grad-CAM is ReLU'd to all zeros: rho 0 (explanation destroyed), not NaN."""
    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16_224", 2, 1, img_size=32, small_input_stem=True).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    res = randomisation_check(vit, x, 1, "gradcam", seed=0)
    rnd = res["randomised_maps"].flatten(1)
    flat = (rnd.amax(1) == rnd.amin(1)).numpy()
    assert res["n_randomised_flat"] == flat.sum() >= 1  # the seeded case exercises the branch
    assert (res["spearman"][flat] == 0).all() and res["n_undefined"] == 0
    assert res["mean_abs_spearman"] < 0.5


def test_randomise_model_copies_and_reinitialises(trained) -> None:
    before = copy.deepcopy(trained.state_dict())
    rnd = randomise_model(trained, seed=3)
    for name, p in trained.state_dict().items():
        assert torch.equal(p, before[name]), f"original {name} was modified"
    for (name, p), q in zip(trained.named_parameters(), rnd.parameters()):
        assert not torch.equal(p, q), f"{name} was not re-initialised"
    again = randomise_model(trained, seed=3)
    for p, q in zip(rnd.parameters(), again.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- Captum metrics


def test_infidelity_ig_better_than_random_maps(trained, batch, ig_maps) -> None:
    x, pred = batch
    ig = infidelity_scores(trained, x, pred, maps=ig_maps, n_perturb_samples=16)
    random_maps = torch.rand(ig_maps.shape, generator=torch.Generator().manual_seed(0))
    rnd = infidelity_scores(trained, x, pred, maps=random_maps, n_perturb_samples=16)
    assert ig.shape == (8,) and np.isfinite(ig).all() and (ig >= 0).all()
    assert ig.mean() < 0.7 * rnd.mean(), (ig, rnd)
    # computing the maps inside gives the same numbers (one channel: per-channel map = summed map)
    np.testing.assert_allclose(
        infidelity_scores(trained, x, pred, "integrated_gradients", n_perturb_samples=16), ig, rtol=1e-4, atol=1e-7
    )
    with pytest.raises(ValueError, match="exactly one"):
        infidelity_scores(trained, x, pred, "gradcam", maps=ig_maps)


def test_sensitivity(trained, batch) -> None:
    x, pred = batch
    x, pred = x[:4], pred[:4]
    s = sensitivity_scores(trained, x, pred, "integrated_gradients", n_perturb_samples=3, n_steps=16)
    assert s.shape == (4,) and np.isfinite(s).all() and (s > 0).all()
    np.testing.assert_array_equal(
        s, sensitivity_scores(trained, x, pred, "integrated_gradients", n_perturb_samples=3, n_steps=16)
    )
    zero = sensitivity_scores(trained, x, pred, "integrated_gradients", n_perturb_samples=2, perturb_radius=0.0,
                              n_steps=16)
    np.testing.assert_allclose(zero, 0.0, atol=1e-6)
    big = sensitivity_scores(trained, x, pred, "integrated_gradients", n_perturb_samples=3, perturb_radius=0.3,
                             n_steps=16)
    assert big.mean() > s.mean()
    gc = sensitivity_scores(trained, x, pred, "gradcam", n_perturb_samples=2, batch_size=3)
    assert gc.shape == (4,) and np.isfinite(gc).all()


# ---------------------------------------------------------------- agreement


def test_compare_maps_identity_negation_symmetry() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 12, 12, generator=g), torch.randn(5, 12, 12, generator=g)
    same = compare_maps(a, a)
    np.testing.assert_allclose(same["spearman"], 1.0)
    np.testing.assert_allclose(same["top_overlap"], 1.0)
    np.testing.assert_allclose(same["top_jaccard"], 1.0)
    np.testing.assert_allclose(compare_maps(a, -a)["spearman"], -1.0)
    assert compare_maps(a, -a)["mean_top_overlap"] == 0.0
    ab, ba = compare_maps(a, b, 0.2), compare_maps(b, a, 0.2)
    for key in ("spearman", "top_overlap", "top_jaccard"):
        np.testing.assert_allclose(ab[key], ba[key])
    assert ab["k"] == round(0.2 * 144)


def test_spearman_matches_scipy_with_ties() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (4, 9, 9), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (4, 9, 9), generator=g).float()
    ref = [spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(4)]
    np.testing.assert_allclose(spearman_per_image(a, b), ref, atol=1e-12)
    rho = compare_maps(torch.zeros(2, 4, 4), torch.randn(2, 4, 4))
    assert np.isnan(rho["spearman"]).all() and rho["n_undefined"] == 2 and np.isnan(rho["mean_spearman"])


def test_top_fraction_overlap_by_hand() -> None:
    a = torch.arange(10.0)[None]  # top 2: pixels 9, 8
    b = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 20, 0.5]])  # top 2: pixels 8, 7
    overlap, jaccard = top_fraction_overlap(a, b, top_fraction=0.2)
    np.testing.assert_allclose(overlap, [0.5])
    np.testing.assert_allclose(jaccard, [1 / 3])


# ---------------------------------------------------------------- bad input


def test_bad_input(trained, batch, ig_maps) -> None:
    x, pred = batch
    with pytest.raises(ValueError, match=r"\(8, 28, 28\)"):
        deletion_insertion(trained, x, pred, ig_maps[:, :10])
    with pytest.raises(ValueError, match="task_type"):
        deletion_insertion(trained, x, pred, ig_maps, task_type="segmentation")
    with pytest.raises(ValueError, match="insertion_start"):
        deletion_insertion(trained, x, pred, ig_maps, insertion_start="noise")
    with pytest.raises(ValueError, match="same shape"):
        compare_maps(ig_maps, ig_maps[:4])
    with pytest.raises(ValueError, match="top_fraction"):
        compare_maps(ig_maps, ig_maps, top_fraction=0.0)
