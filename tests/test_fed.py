"""Federated averaging: aggregation rules, garbage rejection, top-k, DP-SGD, FedProx, resume."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from splitfl.data import load_splits
from splitfl.fed.aggregate import aggregate, check_update, norm_outliers
from splitfl.fed.compress import TopKCompressor, decompress
from splitfl.fed.flat import FlatSpec
from splitfl.engine import RunError, make_fabric
from splitfl.train import run
from tests.test_train import tiny_config


def fed_config(**overrides):
    """Tiny federation: timm's 0.37M-parameter test_resnet, 3 IID sites, 2 rounds."""
    cfg = tiny_config(regime="fedavg", **overrides)
    cfg.model.name = "test_resnet"
    cfg.data.partition.num_sites = 3
    return cfg


def make_runner(cfg, tmp_path):
    from splitfl.fed.runner import FedRunner

    fabric = make_fabric(cfg.train)
    torch.manual_seed(cfg.seed)
    return FedRunner(fabric, cfg, load_splits(cfg.data), tmp_path)


# ----------------------------------------------------------------------------- building blocks


def test_flat_spec_round_trips_and_selects_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(2, 3))
    spec = FlatSpec(model)
    assert "1.num_batches_tracked" not in spec.names and "1.running_mean" in spec.names
    flat = spec.flatten(model)
    other = copy.deepcopy(model)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    spec.load_into(other, flat)
    np.testing.assert_array_equal(spec.flatten(other), flat)
    mask = spec.select(["3.*"])
    assert mask.sum() == 2 * 3 + 3
    with pytest.raises(ValueError, match="match no parameter"):
        spec.select(["head.*"])
    with pytest.raises(ValueError, match="shape"):
        spec.load_into(other, flat[:-1])


def test_aggregators_and_their_robustness():
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=50).astype(np.float32) for _ in range(5)]
    weights = [10, 20, 30, 40, 100]
    expected = sum(w * u for w, u in zip(weights, updates)) / sum(weights)
    np.testing.assert_allclose(aggregate(updates, weights, "mean"), expected, rtol=1e-5, atol=1e-6)
    poisoned = updates[:4] + [np.full(50, 1e6, dtype=np.float32)]
    for rule in ("median", "trimmed_mean"):
        robust = aggregate(poisoned, weights, rule, trim_ratio=0.2)
        assert np.abs(robust).max() < 5  # one wild site cannot drag a robust rule
    assert np.abs(aggregate(poisoned, weights, "mean")).min() > 1e4  # the plain mean it drags
    with pytest.raises(ValueError, match="trim_ratio"):
        aggregate(updates, weights, "trimmed_mean", trim_ratio=0.5)


@pytest.mark.parametrize(
    "update, reason",
    [
        (np.array([1.0, np.nan, 2.0], dtype=np.float32), "non-finite"),
        (np.zeros(4, dtype=np.float32), "shape"),
        (np.zeros(3, dtype=np.int64), "dtype"),
        ([0.0, 0.0, 0.0], "not an array"),
    ],
)
def test_check_update_names_the_problem(update, reason):
    assert reason in check_update(update, 3)


def test_norm_outliers_needs_a_majority_reference():
    assert norm_outliers({0: 1.0, 1: 1e6}, 10) == {}  # two updates: no trustworthy median
    flagged = norm_outliers({0: 1.0, 1: 1.2, 2: 0.9, 3: 50.0}, 10)
    assert list(flagged) == [3] and "median" in flagged[3]


def test_topk_error_feedback_loses_nothing():
    rng = np.random.default_rng(1)
    comp = TopKCompressor(1000, 0.05)
    sent = np.zeros(1000)
    total = np.zeros(1000)
    for _ in range(6):
        u = rng.normal(size=1000).astype(np.float32)
        total += u
        payload = comp.compress(u)
        assert len(payload) == 12 + 8 * 50  # header + 50 (index, value) pairs: 5% of the dense 4000 bytes
        sent += decompress(payload, 1000)
    np.testing.assert_allclose(sent + comp.residual, total, atol=1e-4)
    with pytest.raises(ValueError, match="vector of 1000"):
        decompress(payload, 999)
    with pytest.raises(ValueError, match="bytes"):
        decompress(payload[:-4], 1000)


# ----------------------------------------------------------------------------- rounds


def test_fedavg_round_is_the_count_weighted_mean_of_site_updates(tmp_path):
    cfg = fed_config()
    cfg.data.partition.scheme = "quantity"  # unequal sites, so weighting matters
    runner = make_runner(cfg, tmp_path)
    start = runner.global_flat.copy()
    lr = runner.lr()
    reference = make_runner(cfg, tmp_path / "ref")  # independent copy of the same federation
    updates = [reference.local_update(i, 0, lr)[0] for i in range(3)]
    sizes = [len(s) for s in runner.sites]
    assert len(set(sizes)) > 1
    runner.train_epoch(0, "round 1")
    expected = start + sum(n * u for n, u in zip(sizes, updates)) / sum(sizes)
    np.testing.assert_allclose(runner.global_flat, expected, atol=1e-6)
    assert runner.epoch_extras()["accepted"] == 3


@pytest.mark.parametrize(
    "garbage, reason",
    [
        (lambda u: u * np.nan, "NaN"),
        (lambda u: u[:-7], "shape"),
        (lambda u: u * 1e4, "median norm"),
    ],
)
def test_garbage_update_is_rejected_and_the_round_goes_on(tmp_path, garbage, reason):
    cfg = fed_config()
    cfg.data.partition.num_sites = 4  # the norm check needs 3+ updates
    runner = make_runner(cfg, tmp_path)
    start = runner.global_flat.copy()
    honest = runner.local_update
    good = {}

    def faulty(site, round_index, lr):
        update, loss = honest(site, round_index, lr)
        if site == 2:
            return garbage(update), loss
        good[site] = update
        return update, loss

    runner.local_update = faulty
    runner.train_epoch(0, "round 1")
    assert [(r.site, r.round) for r in runner.rejections] == [(2, 1)]
    assert reason in runner.rejections[0].reason
    sizes = {s: len(runner.sites[s]) for s in good}
    expected = start + sum(sizes[s] * good[s] for s in good) / sum(sizes.values())
    np.testing.assert_allclose(runner.global_flat, expected, atol=1e-6)
    assert np.all(np.isfinite(runner.global_flat))


@pytest.mark.parametrize("layers", [[], ["head.*"]])
def test_he_aggregation_equals_the_plaintext_round_and_the_server_holds_no_key(tmp_path, layers):
    """fedavg+he: the server adds CKKS ciphertexts with a public context; only key holders decrypt the sum."""
    results = {}
    for secure in ("none", "he"):
        cfg = fed_config()
        cfg.fed.secure = secure
        cfg.fed.he_layers = layers if secure == "he" else []
        runner = make_runner(cfg, tmp_path / secure)
        runner.train_epoch(0, "round 1")
        results[secure] = runner
    he = results["he"]
    np.testing.assert_allclose(he.global_flat, results["none"].global_flat, atol=1e-6)
    assert not he.public_ctx.is_private() and he.secret_ctx.is_private()
    assert not (tmp_path / "he" / "keys" / "consortium.secret").read_bytes() == b""
    fraction = he.result_extras()["protocol"]["he_encrypted_fraction"]
    assert fraction == 1.0 if not layers else 0 < fraction < 0.01
    assert he.result_extras()["protocol"]["server_has_secret_key"] is False


def test_he_round_rejects_tampered_and_malformed_uploads(tmp_path):
    cfg = fed_config()
    cfg.fed.secure = "he"
    runner = make_runner(cfg, tmp_path)
    real_package, real_update = runner._package, runner.local_update

    def tampering(site, update, n_k):
        payload, enc = real_package(site, update, n_k)
        if site == 0:
            enc = enc[:-100] + bytes(100)  # corrupted ciphertext bytes
        return payload, enc

    def faulty(site, round_index, lr):
        update, loss = real_update(site, round_index, lr)
        return (update * np.nan if site == 1 else update), loss

    runner._package, runner.local_update = tampering, faulty
    runner.train_epoch(0, "round 1")
    reasons = {r.site: r.reason for r in runner.rejections}
    assert sorted(reasons) == [0, 1]
    assert "could not be packaged" in reasons[1]  # the site's own software refuses to encrypt NaNs
    assert runner.epoch_extras()["accepted"] == 1 and np.all(np.isfinite(runner.global_flat))


def test_masked_secure_aggregation_equals_the_plaintext_round(tmp_path):
    """Pairwise masks (Bonawitz et al.) cancel: the global model matches plain FedAvg to fixed-point precision."""
    results = {}
    for secure in ("none", "masks"):
        cfg = fed_config()
        cfg.fed.secure = secure
        runner = make_runner(cfg, tmp_path / secure)
        runner.train_epoch(0, "round 1")
        results[secure] = (runner.global_flat, runner.epoch_extras())
    np.testing.assert_allclose(results["masks"][0], results["none"][0], atol=1e-6)
    # masked inputs are 8-byte fixed point plus the key agreement and share traffic
    assert results["masks"][1]["bytes_up"] > 1.9 * results["none"][1]["bytes_up"]


def test_fedavg_end_to_end_with_sampling_and_topk(tmp_path):
    cfg = fed_config()
    cfg.fed.client_fraction = 0.67
    cfg.fed.topk_fraction = 0.1
    metrics = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["regime"] == "fedavg" and saved["protocol"]["secure"] == "none"
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "bytes_up" in history[0]
    # 2 of 3 sites per round, each uploading ~10% of the dense update as (index, value) pairs
    dense = 4 * FlatSpec(make_runner(cfg, tmp_path / "probe").model).size
    assert 0.1 * dense < metrics["wire"]["bytes_up_per_round"] / 2 < 0.25 * dense
    assert metrics["rejections"] == []


def test_fedprox_stays_closer_to_the_global_model(tmp_path):
    cfg = fed_config()
    cfg.train.optimizer, cfg.train.lr = "sgd", 0.05
    norms = {}
    for regime, mu in (("fedavg", 0.0), ("fedprox", 5.0)):
        cfg.regime, cfg.fed.mu = regime, mu
        runner = make_runner(cfg, tmp_path / regime)
        params = {name for name, _ in runner.model.named_parameters()}
        weights = np.concatenate([np.ones(e.size, bool) if e.name in params else np.zeros(e.size, bool) for e in runner.spec.entries])
        norms[regime] = np.linalg.norm(runner.local_update(0, 0, runner.lr())[0][weights])  # BN statistics feel no pull
    assert norms["fedprox"] < 0.9 * norms["fedavg"]


def test_fedavg_dp_reports_epsilon_per_site_and_round(tmp_path):
    cfg = fed_config()
    cfg.fed.dp_target_epsilon, cfg.fed.dp_max_grad_norm = 8.0, 1.0
    metrics = run(cfg, tmp_path)
    privacy = metrics["privacy"]
    assert len(privacy["epsilon_per_site"]) == 3 and len(privacy["epsilon_per_round"]) == 2
    assert all(0 < e <= 8.0 * 1.02 for e in privacy["epsilon_per_site"])
    assert privacy["epsilon_per_round"][0][0] < privacy["epsilon_per_round"][1][0]
    assert all(s > 0 for s in privacy["noise_multiplier_per_site"])
    assert "GroupNorm" in metrics["protocol"]["norm"]
    state = torch.load(tmp_path / "best_model.pt", weights_only=False)["model"]
    assert not any("running_mean" in k for k in state)  # no BatchNorm left


def test_dp_sgd_really_clips_per_sample_gradients(tmp_path):
    """With a tiny clipping bound and almost no noise, a site's update is bounded by steps x lr x C."""
    cfg = fed_config()
    cfg.train.optimizer, cfg.train.lr = "sgd", 1.0
    cfg.train.momentum = 0.0
    cfg.fed.dp_noise_multiplier, cfg.fed.dp_max_grad_norm = 1e-6, 1e-3
    runner = make_runner(cfg, tmp_path)
    site = runner.sites[0]
    update, _ = runner.local_update(0, 0, runner.lr())
    # Opacus divides the clipped sum by the expected batch size; a Poisson batch may be larger, hence the slack.
    bound = site.batches_per_epoch * 3 * cfg.train.lr * cfg.fed.dp_max_grad_norm
    assert 0 < np.linalg.norm(update) <= bound
    cfg.fed.dp_noise_multiplier = 0.0
    plain_update, _ = make_runner(cfg, tmp_path / "nodp").local_update(0, 0, runner.lr())
    assert np.linalg.norm(plain_update) > 100 * bound


def test_fedavg_resumes_after_an_interrupt(tmp_path, monkeypatch):
    from splitfl.fed.runner import FedRunner

    cfg = fed_config()
    cfg.fed.dp_noise_multiplier = 1.0
    cfg.fed.topk_fraction = 0.2
    straight = run(cfg, tmp_path / "straight")
    real = FedRunner.train_epoch
    calls = []

    def interrupted(self, epoch, desc):
        calls.append(epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, epoch, desc)

    monkeypatch.setattr(FedRunner, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "resumed")
    monkeypatch.setattr(FedRunner, "train_epoch", real)
    resumed = run(cfg, tmp_path / "resumed")
    assert resumed["test"]["auroc_macro"] == pytest.approx(straight["test"]["auroc_macro"], abs=1e-9)
    assert resumed["privacy"]["epsilon"] == pytest.approx(straight["privacy"]["epsilon"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"secure": "he", "aggregator": "median"}, "only ever holds the sum"),
        ({"secure": "masks", "topk_fraction": 0.1}, "top-k"),
        ({"he_layers": ["fc.*"]}, "needs fed.secure: he"),
        ({"dp_noise_multiplier": 1.0, "dp_target_epsilon": 8.0}, "not both"),
        ({"client_fraction": 0.0}, "client_fraction"),
    ],
)
def test_bad_federation_configs_are_refused(tmp_path, overrides, match):
    cfg = fed_config()
    for k, v in overrides.items():
        setattr(cfg.fed, k, v)
    with pytest.raises(RunError, match=match):
        run(cfg, tmp_path)


def test_local_steps_one_with_plain_sgd_is_fedsgd(tmp_path):
    """fed.local_steps: 1 with SGD (no momentum) sends -lr x the gradient of the round's first batch."""
    from torch.utils.data import DataLoader

    from splitfl.fed.site import _seed

    cfg = fed_config()
    cfg.fed.local_steps = 1
    cfg.train.optimizer, cfg.train.momentum, cfg.train.lr, cfg.train.batch_size = "sgd", 0.0, 0.1, 4
    runner = make_runner(cfg, tmp_path)
    site = runner.sites[0]
    assert site.steps_per_round == 1
    update, _ = runner.local_update(0, 0, cfg.train.lr)

    model = copy.deepcopy(runner.model)
    model.train()
    loader = DataLoader(site.dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(_seed(cfg.seed, 0, 0)))
    images, targets = next(iter(loader))
    model.zero_grad()
    site.loss_fn(model(images), targets).backward()
    grad = np.concatenate([p.grad.detach().reshape(-1).numpy() if p.grad is not None else np.zeros(p.numel(), np.float32)
                           for p in model.parameters()])
    assert runner.spec.size == grad.size  # the flat vector is the parameters only (GroupNorm: no buffers)
    np.testing.assert_allclose(update, -cfg.train.lr * grad, atol=1e-6)

    cfg.fed.local_steps = 0
    with pytest.raises(RunError, match="local_steps"):
        make_runner(cfg, tmp_path / "bad")


@pytest.mark.parametrize("secure", ["none", "he"])
def test_transcript_records_the_servers_view_byte_for_byte(tmp_path, secure):
    """fed.transcript: the global model and each upload as received, per round, plus the sites' ground truth."""
    from splitfl.fed.server import vector_from_bytes

    cfg = fed_config()
    cfg.fed.transcript, cfg.fed.transcript_max_rounds, cfg.fed.secure = True, 1, secure
    cfg.fed.local_steps = 1
    runner = make_runner(cfg, tmp_path)
    start = runner.global_flat.copy()
    sent = {}
    original = runner._package

    def spy(site, update, n_k):
        sent[site] = original(site, update, n_k)
        return sent[site]

    runner._package = spy
    runner.train_epoch(0, "round")
    first_round = dict(sent)
    runner.train_epoch(1, "round")  # beyond transcript_max_rounds: not recorded
    folder = tmp_path / "transcript"
    index = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    assert {e["step"] for e in index} == {0}
    files = {e["kind"]: (folder / e["file"]).read_bytes() for e in index}
    np.testing.assert_array_equal(vector_from_bytes(files["global_model"], "global", start.size), start)
    for site, (payload, enc) in first_round.items():
        assert files[f"site{site}_update"] == payload
        assert files.get(f"site{site}_update_enc") == enc
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["config"]["fed"]["secure"] == secure and meta["site_sizes"] == [len(s) for s in runner.sites]
    truth = [json.loads(line) for line in (folder / "ground_truth.jsonl").read_text().splitlines()]
    assert [(t["round"], t["site"]) for t in truth] == [(0, 0), (0, 1), (0, 2)]
    assert all(len(t["batches"]) == 1 and len(t["batches"][0]) == min(cfg.train.batch_size, len(runner.sites[t["site"]]))
               for t in truth)


def test_dp_empty_poisson_batches_still_add_noise_and_count(tmp_path):
    """An empty Poisson batch is a DP-SGD step too: the accountant counts every step, empty or not."""
    cfg = fed_config()
    cfg.fed.dp_noise_multiplier, cfg.fed.local_steps, cfg.train.batch_size = 1.0, 3, 1  # P(empty batch) ~ 0.37
    runner = make_runner(cfg, tmp_path)
    site = runner.sites[0]
    torch.manual_seed(0)
    steps, saw_empty = 0, False
    for round_index in range(6):
        runner.local_update(0, round_index, cfg.train.lr)
        steps += len(site.last_batches)
        saw_empty |= [] in site.last_batches
    assert saw_empty and steps == 6 * 3
    assert sum(n for _, _, n in site.accountant.history) == steps  # no step went uncounted
