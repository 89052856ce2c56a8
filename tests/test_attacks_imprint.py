"""attacks.imprint: the imprint-module attack ("Robbing the Fed") on a timm resnet18 trained one SGD step.

The attacker calibrates on its own images (synthetic X-rays of seed 0); the
hospital's private batch is a different set (seed 1); re-identification
distractors a third (seed 2). An image counts as recovered when its best
candidate has SSIM >= 0.9 (pinned SSIM of attacks.metrics); the harness'
leakage rule (attacks.scoring: Hungarian pairing + re-identification + gain
over the mean image) is reported beside it. Run with ``-s`` to see the rates.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacks.gradient_inversion import add_gaussian_noise
from attacks.imprint import (
    IMPRINT_BIAS,
    IMPRINT_WEIGHT,
    ImprintBlock,
    imprint_tensors,
    imprinted,
    recover,
)
from attacks.metrics import pairwise_ssim
from attacks.runtime import torch_threads
from attacks.scoring import score_observation
from splitfl.models import create_model

SHAPE = (1, 28, 28)
BINS = 256
LR = 0.1
RECOVERED_SSIM = 0.9


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data():
    """Attacker's auxiliary images, the hospital's private batch (+ labels), outside distractors: three seeds."""
    from splitfl.data.synthetic import make_synthetic

    aux = make_synthetic("xray", n_train=2048, n_val=1, n_test=1, size=28, seed=0).train._x.clone()
    private = make_synthetic("xray", n_train=64, n_val=1, n_test=1, size=28, seed=1).train
    distractors = make_synthetic("xray", n_train=1, n_val=1, n_test=200, size=28, seed=2).test._x.clone()
    return aux, private._x.clone(), private._y.clone(), distractors


def _resnet(block: ImprintBlock) -> torch.nn.Module:
    torch.manual_seed(0)
    return imprinted(create_model("resnet18", num_classes=2, in_chans=1), block)


@pytest.fixture(scope="module")
def model(data):
    return _resnet(ImprintBlock.calibrate(data[0], BINS))


def sgd_update(model, x, y, lr=LR, steps=1, batch=None):
    """What a hospital sends and the server diffs: {name: w_after - w_before} after local SGD on (x, y).

    ``batch``: local minibatch size (default: all of x in every step). Batch norm trains in batch mode,
    except for a single image (28 px leaves layer4 at 1x1, where batch statistics of one image do not exist).
    """
    local = copy.deepcopy(model)
    local.train(len(x) > 1 and (batch is None or batch > 1))
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    batches = [(x, y)] * steps if batch is None else [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(local(xb), yb).backward()
        opt.step()
    before, after = dict(model.named_parameters()), dict(local.named_parameters())
    return {k: (after[k] - before[k]).detach() for k in before}


def attack(update) -> torch.Tensor:
    return recover(*imprint_tensors(update), SHAPE)


def recovered_rate(candidates: torch.Tensor, originals: torch.Tensor) -> float:
    """Share of originals whose best candidate has SSIM >= 0.9."""
    if len(candidates) == 0:
        return 0.0
    best = pairwise_ssim(originals, candidates).max(dim=1).values
    return float((best >= RECOVERED_SSIM).float().mean())


def leak_rate(candidates: torch.Tensor, originals: torch.Tensor, distractors: torch.Tensor) -> float:
    """The harness' rule: rectangular Hungarian pairing, re-identification among 200 outside images, gain >= 0.1."""
    if len(candidates) == 0:
        return 0.0
    scored, _ = score_observation(candidates, originals, list(range(len(originals))), distractors,
                                  distractors.mean(dim=0), "imprint")
    return float(np.mean([s.leaked for s in scored]))


# --------------------------------------------------------------------------- construction


def test_block_is_a_small_residual_with_findable_parameters(data, model):
    aux, x, _, _ = data
    block = model.imprint
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == [IMPRINT_WEIGHT, IMPRINT_BIAS, "imprint.linear_out.weight"]
    assert "thresholds" not in str(list(model.state_dict()))  # nothing extra is broadcast
    w1, b1 = block.linear_in.weight, block.linear_in.bias
    assert torch.equal(w1, w1[:1].expand_as(w1))  # every row the same measurement
    assert bool((b1[:-1] > b1[1:]).all())  # thresholds c = -b1/gain strictly increasing
    w2 = block.linear_out.weight
    assert torch.equal(w2, w2[:, :1].expand_as(w2))  # every column the same
    # The private batch (not used for calibration) spreads over the bins, and the input barely changes.
    proj = x.flatten(1).double().mean(dim=1)
    occupied = torch.bucketize(proj, block.thresholds.double(), right=True).unique()
    assert len(occupied) >= 56, len(occupied)
    with torch.no_grad():
        residual = block(x) - x
    assert float(residual.pow(2).mean(dim=(1, 2, 3)).sqrt().max()) < 0.02
    assert model(x[:4]).shape == (4, 2)
    with pytest.raises(ValueError, match="one auxiliary image per bin"):
        ImprintBlock.calibrate(aux[:10], 16 * 2)
    with pytest.raises(KeyError, match="no imprint block"):
        imprint_tensors(dict(create_model("resnet18", num_classes=2, in_chans=1).named_parameters()))


# --------------------------------------------------------------------------- the attack


def test_one_private_image_comes_back_exactly(data, model):
    _, x, y, _ = data
    candidates = attack(sgd_update(model, x[:1], y[:1]))
    assert candidates.shape == (1, *SHAPE)
    err = float((candidates[0] - x[0]).abs().max())
    print(f"\nimprint batch 1: max |recovered - private| = {err:.2e}")
    assert err < 1e-4


def test_gradient_and_update_give_the_same_images(data, model):
    """-lr (and the batch mean 1/B) multiply numerator and denominator alike: they cancel."""
    _, x, y, _ = data
    local = copy.deepcopy(model).train()
    F.cross_entropy(local(x[:8]), y[:8]).backward()
    from_grad = recover(local.imprint.linear_in.weight.grad, local.imprint.linear_in.bias.grad, SHAPE)
    from_update = attack(sgd_update(model, x[:8], y[:8]))
    from_negated = attack({k: -v * 7.0 for k, v in sgd_update(model, x[:8], y[:8], lr=0.01).items()})
    assert from_grad.shape == from_update.shape == from_negated.shape == (8, *SHAPE)
    assert torch.allclose(from_grad, from_update, atol=1e-4)
    assert torch.allclose(from_grad, from_negated, atol=1e-4)


def test_recovery_rates_by_batch_size(data, model):
    _, x, y, distractors = data
    rates = {}
    for b in (8, 32, 64):
        candidates = attack(sgd_update(model, x[:b], y[:b]))
        rates[b] = (recovered_rate(candidates, x[:b]), leak_rate(candidates, x[:b], distractors), len(candidates))
    print("\nimprint, resnet18, 256 bins, one SGD step:")
    for b, (r, leak, k) in rates.items():
        print(f"  batch {b:2d}: {k:3d} candidates, recovered (SSIM >= 0.9) {r:.0%}, harness leakage {leak:.0%}")
    assert rates[8][0] >= 0.85
    assert rates[32][0] >= 0.8 and rates[32][1] >= 0.8
    assert rates[64][0] >= 0.6


# --------------------------------------------------------------------------- controls


def test_control_candidates_from_another_batch_match_nothing(data, model):
    """Real X-rays of the same distribution, but not these: SSIM >= 0.9 must not fire on lookalikes."""
    _, x, y, _ = data
    candidates = attack(sgd_update(model, x[:32], y[:32]))
    wrong = recovered_rate(candidates, x[32:64])
    best = float(pairwise_ssim(x[32:64], candidates).max())
    print(f"\ncontrol, update of batch A scored against batch B: recovered {wrong:.0%} (best SSIM {best:.2f})")
    assert wrong == 0.0


def test_control_ordinary_block_leaks_far_less(data, model):
    """The same recovery on an ordinary block (PyTorch's random init) and on random W2 columns.

    Not exactly 0: a ReLU row of a random dense layer that only one image of the batch activates
    carries that image exactly (dW_i / db_i = x), and if the next row is inactive for all images
    the bin difference returns it. On similar-looking X-rays such rows exist at batch 32, so a few
    images leak through any dense first layer; the imprint makes it nearly all of them.
    """
    _, x, y, _ = data
    imprint_rate = recovered_rate(attack(sgd_update(model, x[:32], y[:32])), x[:32])
    torch.manual_seed(1)
    plain = _resnet(ImprintBlock(SHAPE, BINS))
    plain_rate = recovered_rate(attack(sgd_update(plain, x[:32], y[:32])), x[:32])
    with torch.no_grad():
        active = (plain.imprint.linear_in(x[:32].flatten(1)) > 0).sum(dim=0)
    mixed = ImprintBlock.calibrate(data[0], BINS)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        w2 = mixed.linear_out.weight
        w2.mul_(1.0 + torch.randn(w2.shape, generator=gen))  # columns no longer equal
    mixed_rate = recovered_rate(attack(sgd_update(_resnet(mixed), x[:32], y[:32])), x[:32])
    print(f"\ncontrol at batch 32: imprint {imprint_rate:.0%}; ordinary random block {plain_rate:.0%} "
          f"({int((active == 1).sum())} of {BINS} rows active for exactly one image); "
          f"calibrated W1 with random W2 columns {mixed_rate:.0%}")
    assert plain_rate <= 0.3 and mixed_rate <= 0.3
    assert imprint_rate - max(plain_rate, mixed_rate) >= 0.6


# --------------------------------------------------------------------------- what helps and what does not


def test_defences(data, model):
    """Secure sum of sites and repeated steps on one batch do not stop it; DP noise does."""
    _, x, y, _ = data
    sites = [sgd_update(model, x[8 * s:8 * s + 8], y[8 * s:8 * s + 8]) for s in range(4)]
    total = {k: sum(u[k] for u in sites) for k in (IMPRINT_WEIGHT, IMPRINT_BIAS)}
    secure_sum = recovered_rate(attack(total), x[:32])
    five_steps = recovered_rate(attack(sgd_update(model, x[:32], y[:32], steps=5)), x[:32])
    epoch = recovered_rate(attack(sgd_update(model, x[:32], y[:32], batch=8)), x[:32])
    update = sgd_update(model, x[:32], y[:32])
    names = list(update)
    noisy = {}
    for level in (1e-5, 1e-3):
        n = dict(zip(names, add_gaussian_noise([update[k] for k in names], level, seed=0)))
        noisy[level] = recovered_rate(attack(n), x[:32])
    print(f"\ndefences, 32 images: secure sum of 4 sites x 8 {secure_sum:.0%}; 5 local steps on the batch "
          f"{five_steps:.0%}; one local epoch in 4 minibatches of 8 {epoch:.0%}; Gaussian noise "
          + ", ".join(f"{lvl:g} x ||update|| {r:.0%}" for lvl, r in noisy.items()))
    assert secure_sum >= 0.8  # the aggregate is linear: 4 sites x 8 images = one batch of 32
    assert five_steps >= 0.8
    assert noisy[1e-3] == 0.0


# --------------------------------------------------------------------------- real data


def test_real_pneumoniamnist(medmnist_dir):
    """Aux: PneumoniaMNIST train split (the attacker's stand-in public data); private: the test split."""
    path = medmnist_dir / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with np.load(path) as npz:
        aux = torch.from_numpy(npz["train_images"].astype(np.float32) / 127.5 - 1.0)[:, None]
        x = torch.from_numpy(npz["test_images"][:64].astype(np.float32) / 127.5 - 1.0)[:, None]
        y = torch.from_numpy(npz["test_labels"][:64, 0].astype(np.int64))
    model = _resnet(ImprintBlock.calibrate(aux, BINS))
    rates = {b: recovered_rate(attack(sgd_update(model, x[:b], y[:b])), x[:b]) for b in (8, 32, 64)}
    print("\nimprint on PneumoniaMNIST: " + ", ".join(f"batch {b} {r:.0%}" for b, r in rates.items()))
    assert rates[32] >= 0.8
