"""attacks.malicious_fed: a malicious FedAvg server (imprint module) against the real Site/FedRunner code.

Small and fast: synthetic 16 px X-rays, splitfl's sigmoid LeNet behind the imprint block
(``imprint_splitfl_lenet``), 2 hospitals with 2 local SGD steps (momentum 0.9) each in the attacked
round. The hospitals' images are scored against >= 100 outside images (the test split); the
attacker calibrates on the validation split and the training images no hospital holds.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from attacks.imprint import IMPRINT_BIAS, IMPRINT_WEIGHT, recover
from attacks.malicious_fed import (
    VIEW_AGGREGATE,
    VIEW_CIPHERTEXT,
    VIEW_SITE,
    ImprintFront,
    ImprintSettings,
    run_imprint_attack,
)
from attacks.metrics import pairwise_ssim
from attacks.runtime import torch_threads
from splitfl.config import RunConfig
from splitfl.data import cap_train, load_splits, partition_dataset
from splitfl.engine import RunError
from splitfl.fed.flat import FlatSpec
from splitfl.fed.server import build_fed_model, vector_from_bytes
from splitfl.fed.site import Site, model_change_problem
from splitfl.runs.transcript import read_transcript


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def consortium() -> RunConfig:
    """The consortium's config before the attacker touches it: plain LeNet, local SGD with momentum."""
    cfg = RunConfig(regime="fedavg")
    cfg.data.source, cfg.data.modality, cfg.data.size = "synthetic", "xray", 16
    cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 400, 300, 120
    cfg.model.name = "splitfl_lenet"
    cfg.train.optimizer, cfg.train.lr, cfg.train.momentum, cfg.train.scheduler = "sgd", 0.01, 0.9, "none"
    return cfg


def attack(tmp_path: Path, regime: str = "fedavg", batch: int = 8, name: str = "run", **settings) -> dict:
    settings.setdefault("gain", 0.03)
    out = run_imprint_attack(consortium(), regime, batch, tmp_path / name,
                             ImprintSettings(num_sites=2, local_steps=2, **settings), log=lambda *_: None)
    json.dumps(out)  # the summary is JSON-able as returned
    return out


# --------------------------------------------------------------------------- the model the hospitals build


def test_the_named_model_is_built_by_the_hospitals_factory_and_is_benign(tmp_path):
    cfg = consortium()
    cfg.model.name = "imprint_splitfl_lenet"
    cfg.model.timm_kwargs = {"imprint_bins": 32}
    model = build_fed_model(cfg, 2, 1)  # what every party builds from the config, by name
    body = model.encoder.body
    assert isinstance(body, ImprintFront)
    names = FlatSpec(model).names
    assert "encoder.body.imprint.linear_in.weight" in names and "encoder.body.imprint.linear_out.weight" in names
    assert model.encoder.body.imprint.linear_in.weight.shape == (32, 16 * 16)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(body.imprint(x), x)  # W2 = 0: the agreed block is the identity
        inner = model.head(body.model.forward_head(body.model.forward_features(x), pre_logits=True))
        assert torch.equal(model(x), inner)
    cfg.fed.dp_noise_multiplier = 1.0
    build_fed_model(cfg, 2, 1)  # Opacus accepts it (DP-SGD trains it like any model)


# --------------------------------------------------------------------------- the attack against real hospitals


@pytest.mark.parametrize("batch", [8, 16])
def test_malicious_server_recovers_most_images_from_plain_fedavg(tmp_path, batch):
    out = attack(tmp_path, batch=batch, gain=None)  # gain chosen by simulating a hospital on its own images
    assert out["headline_view"] == VIEW_SITE and out["refused"] is None
    assert out["images"] == 2 * 2 * batch  # every image of both hospitals' attacked round
    assert out["candidates"] <= out["images"]  # never more candidates than images: no lucky extra matches
    assert out["leakage_rate"] >= 0.8, out["leakage_rate"]
    assert out["chance_p_value"] < 1e-9 and out["chance_p_value_any_candidate"] < 1e-9
    assert out["leakage_rate"] > 3 * out["chance_leakage_rate_any_candidate"]
    assert out["ssim_mean"] > 0.85
    assert Path(out["montage"]).is_file() and Path(out["leakage_json"]).is_file()
    assert out["gain"] in ImprintSettings().gains and out["gain_trials"]


def test_the_recorded_server_view_holds_the_crafted_broadcast_and_the_leaking_upload(tmp_path):
    """fed.transcript on: the attack needs nothing but what the server recorded (broadcast, uploads)."""
    out = attack(tmp_path, transcript=True)
    t = read_transcript(tmp_path / "run" / "run" / "transcript")
    where = {name: (shape, offset) for name, shape, offset in t.meta["parameters"]}
    (w1_shape, w1_at), (_, b1_at) = (where[f"encoder.body.{IMPRINT_WEIGHT}"], where[f"encoder.body.{IMPRINT_BIAS}"])
    _, w2_at = where["encoder.body.imprint.linear_out.weight"]
    size = sum(int(torch.tensor(shape).prod()) for shape, _ in where.values())
    bins, d = w1_shape
    before, crafted = (vector_from_bytes(t.payload(r, "global_model"), "model", size) for r in (0, 1))
    assert not before[w2_at:w2_at + bins * d].any() and crafted[w2_at:w2_at + bins * d].any()  # switched on in round 1
    upload = torch.from_numpy(vector_from_bytes(t.payload(1, "site0_update"), "update", size)).double()
    images = recover(upload[w1_at:w1_at + bins * d].reshape(bins, d), upload[b1_at:b1_at + bins], (1, 16, 16), limit=16)
    truth = sorted({i for batch in t.truth(1, 0) for i in batch})
    cfg = t.run_config()  # the evaluator's side: the hospital's images behind that upload
    full = load_splits(dataclasses.replace(cfg.data, max_train=None))
    site0 = partition_dataset(cap_train(full, cfg.data.max_train, cfg.data.seed).train, cfg.data.partition)[0]
    best = pairwise_ssim(site0._x[truth], images).max(dim=1).values
    assert len(images) == 16 and len(truth) == 16 and float((best >= 0.9).float().mean()) >= 0.75
    assert out["leakage_rate"] >= 0.8


def test_honest_server_control(tmp_path):
    """The same model, training and decoding, but the server broadcasts the model as trained."""
    honest = attack(tmp_path, honest=True)
    malicious = attack(tmp_path, name="malicious")
    print(f"\ncontrol: honest server {honest['leakage_rate']:.0%} (SSIM {honest['ssim_mean']:.2f}), "
          f"malicious {malicious['leakage_rate']:.0%} (SSIM {malicious['ssim_mean']:.2f})")
    assert honest["gain"] is None and honest["leakage_rate"] <= 0.25
    assert malicious["leakage_rate"] - honest["leakage_rate"] >= 0.6


def test_he_hides_each_site_but_the_decrypted_aggregate_leaks(tmp_path):
    out = attack(tmp_path, regime="fedavg+he")
    views = out["views"]
    cipher, agg = views[VIEW_CIPHERTEXT], views[VIEW_AGGREGATE]
    print(f"\nfedavg+he: ciphertexts {cipher['leakage_rate']:.0%} (SSIM {cipher['ssim_mean']:.2f}, chance "
          f"{cipher['chance_leakage_rate']:.2%}), aggregate {agg['leakage_rate']:.0%} of {agg['images']}")
    assert out["secure"] == "he"
    assert cipher["candidates"] > 0 and cipher["leakage_rate"] == 0.0 and cipher["chance_p_value"] == 1.0
    assert cipher["ssim_mean"] < 0.3  # the keyless reading is noise
    assert agg["images"] == 2 * 2 * 8 and agg["leakage_rate"] >= 0.6
    assert out["headline_view"] == VIEW_AGGREGATE
    # The server decides who takes part: a round of one site makes the decrypted "aggregate" that site's update.
    alone = attack(tmp_path, regime="fedavg+he", isolate=1, name="isolated")
    assert alone["isolated_site"] == 1 and alone["views"][VIEW_AGGREGATE]["images"] == 2 * 8
    assert alone["views"][VIEW_AGGREGATE]["leakage_rate"] >= 0.8 and alone["views"][VIEW_CIPHERTEXT]["leakage_rate"] == 0.0


def test_dp_noise_breaks_it_and_clipping_alone_does_not(tmp_path):
    """Opacus DP-SGD at the sites: noise multiplier 0.1 leaves nothing; 1e-5 (clipping, almost no noise) leaks."""
    noisy = attack(tmp_path, regime="fedavg+dp", dp_noise_multiplier=0.1, name="noisy")
    faint = attack(tmp_path, regime="fedavg+dp", dp_noise_multiplier=1e-5, name="faint")
    print(f"\nfedavg+dp: sigma 0.1 {noisy['leakage_rate']:.0%} (p {noisy['chance_p_value']:.2g}), "
          f"sigma 1e-5 {faint['leakage_rate']:.0%}")
    assert noisy["dp_noise_multiplier"] == 0.1 and noisy["epsilon"] is not None
    assert noisy["leakage_rate"] <= noisy["chance_leakage_rate_any_candidate"] and noisy["chance_p_value"] > 0.01
    assert faint["leakage_rate"] >= 0.4


def test_model_guard_refuses_the_switched_on_block_but_neither_a_round_0_trap_nor_a_slow_walk(tmp_path):
    """The guard stops a one-round switch; it cannot stop a block on from the start, and only delays a walk in guard-sized steps."""
    guarded = attack(tmp_path, model_guard=0.5, name="guarded")
    assert guarded["refused"] and "imprint.linear_in" in guarded["refused"] and "fed.model_guard" in guarded["refused"]
    assert guarded["candidates"] == 0 and guarded["leakage_rate"] == 0.0
    honest = attack(tmp_path, model_guard=0.5, honest=True, attack_round=3, name="honest")
    assert honest["refused"] is None  # four honest rounds pass the guard
    first = attack(tmp_path, model_guard=0.5, attack_round=0, name="first")  # the block is on from the first broadcast
    assert first["refused"] is None and first["leakage_rate"] >= 0.8
    ramped = attack(tmp_path, model_guard=0.5, ramp=0.9, name="ramped")  # guard-sized steps, one round after another
    print(f"\nmodel_guard 0.5: refused ({guarded['refused'][:60]}...); round-0 trap {first['leakage_rate']:.0%}; "
          f"walked in over {ramped['ramp_rounds']} rounds {ramped['leakage_rate']:.0%}")
    assert ramped["refused"] is None and 2 <= ramped["ramp_rounds"] <= 10 and ramped["leakage_rate"] >= 0.8


# --------------------------------------------------------------------------- pieces


def test_model_change_problem():
    before = {"w": torch.ones(4, 4), "z": torch.zeros(100), "n": torch.tensor(3)}
    assert model_change_problem(before, {k: v.clone() for k, v in before.items()}, 0.5) is None
    small = {"w": torch.ones(4, 4) * 1.2, "z": torch.full((100,), 0.004), "n": torch.tensor(4)}
    assert model_change_problem(before, small, 0.5) is None  # zero tensors may start moving (the floor)
    assert "z moved" in model_change_problem(before, {**small, "z": torch.full((100,), 0.1)}, 0.5)
    assert "w moved" in model_change_problem(before, {**small, "w": torch.ones(4, 4) * 3}, 0.5)
    assert "shape" in model_change_problem(before, {**small, "w": torch.ones(4, 5)}, 0.5)
    assert "names" in model_change_problem(before, {"w": before["w"], "z": before["z"]}, 0.5)
    assert "w moved" in model_change_problem(before, {**small, "w": torch.full((4, 4), float("nan"))}, 0.5)
    cfg = consortium()
    cfg.fed.model_guard = 0.0
    with pytest.raises(RunError, match="model_guard"):
        Site(0, load_splits(cfg.data).train, cfg, torch.nn.CrossEntropyLoss(), torch.device("cpu"))


def test_recover_limit_keeps_the_largest_gaps():
    w = torch.tensor([[3.0, 3.0], [2.0, 2.0], [1.9, 1.9], [0.0, 0.0]])
    b = torch.tensor([3.0, 2.0, 1.9, 0.0])  # gaps 1.0, 0.1, 1.9 (then the last bin: nothing)
    everything = recover(w, b, (1, 1, 2))
    top = recover(w, b, (1, 1, 2), limit=2)
    assert len(everything) == 3 and len(top) == 2
    assert torch.allclose(top, everything[[0, 2]])
    assert len(recover(w, b, (1, 1, 2), limit=0)) == 0
