"""FSHA (attacks.fsha) against the hospitals' real split code: it hijacks a trainable encoder in split-plain and
leaks the images; a frozen encoder stops it; under split-he and split-he-full it reads only ciphertexts."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from attacks.fsha import FeatureSpaceHijacker, FSHAServer, FSHASettings, build_parser, public_encrypt, run_fsha
from attacks.malicious_split import MaliciousRun, honest_factory, malicious_config
from splitfl.config import (
    DataConfig,
    ModelConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
    instantiate,
    run_config_from_namespace,
)
from splitfl.he import PRESETS, create_secret_context, load_public_context, public_context_bytes
from splitfl.he.keys import engine_for
from splitfl.he.linear import PackedLinearHE
from splitfl.he.wire import EncryptedBatch

SETTINGS = FSHASettings(observations=4, distractors=100, pretrain_steps=100, montage_images=8)


def fsha_config(regime: str, cut: str = "stage:1", epochs: int = 16, freeze: bool = False, **train) -> RunConfig:
    """Synthetic X-rays at 16 px, two hospitals, a tiny ResNet; 8 steps per epoch at batch 16."""
    return RunConfig(
        regime=regime, seed=0,
        data=DataConfig(source="synthetic", modality="xray", n_train=128, n_val=128, n_test=100, size=16,
                        partition=PartitionConfig(scheme="iid", num_sites=2)),
        model=ModelConfig(name="test_resnet", small_input_stem=True, freeze_encoder=freeze, cut=cut),
        train=TrainConfig(**{"epochs": epochs, "batch_size": 16, "lr": 1e-3, "optimizer": "adam", "scheduler": "none",
                             "progress": False, "accelerator": "cpu", **train}),
    )


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_fsha_hijacks_a_trainable_encoder_in_split_plain(tmp_path):
    result = run_fsha(fsha_config("split-plain"), tmp_path, SETTINGS, log=lambda m: None)
    assert result["encoder_trainable"] and result["images"] == 4 * 16
    assert result["leakage_rate"] >= 0.8, result["by_view"]
    assert result["chance_leakage_rate"] < 0.05 and result["chance_p_value"] < 1e-6
    assert result["ssim_mean"] > result["mean_image_ssim_mean"] + 0.1
    assert (tmp_path / "leakage.json").is_file() and (tmp_path / "montage.png").is_file()
    json.dumps(result)  # JSON-able for the harness
    # recorded like a passive run: the server's messages of the window (the last epoch's first steps) and the key
    index = [json.loads(line) for line in (tmp_path / "run" / "transcript" / "index.jsonl").read_text().splitlines()]
    steps = sorted({e["step"] for e in index})
    assert steps == list(range(result["hospital_steps"] - 8, result["hospital_steps"] - 4))
    assert [e["kind"] for e in index if e["step"] == steps[0]] == ["activations_in", "logits_out", "logit_grads_in",
                                                                   "activation_grads_out"]


def test_command_line_parses_a_run_config_and_the_attack_settings():
    parser = build_parser()
    ns = instantiate(parser, parser.parse_args(["--regime", "split-he", "--model.cut", "pooled", "--fsha.critic_steps",
                                                "3", "--out", "o"]))
    assert run_config_from_namespace(ns).regime == "split-he" and ns.fsha.critic_steps == 3


def test_a_frozen_encoder_is_not_hijacked(tmp_path):
    """The same attack against a frozen encoder (a quarter of the steps: nothing accrues): the server's gradients change
    nothing, and f~^-1, trained on the pilot's space, does not invert the encoder's."""
    result = run_fsha(fsha_config("split-plain", freeze=True, epochs=4), tmp_path, SETTINGS, log=lambda m: None)
    assert not result["encoder_trainable"]
    assert result["leakage_rate"] <= 0.1, result["by_view"]


def test_fsha_under_split_he_reads_only_ciphertexts(tmp_path):
    settings = FSHASettings(observations=3, distractors=100, pretrain_steps=20)
    result = run_fsha(fsha_config("split-he", cut="pooled", epochs=1), tmp_path, settings, log=lambda m: None)
    assert set(result["by_view"]) == {"activation ciphertexts read without the key: FSHA decoder",
                                      "head update (plaintext): FSHA decoder"}
    for view in result["by_view"].values():
        assert view["leaked"] <= 1 and view["chance_p_value"] > 1e-3, view
    assert result["hospital_steps"] == 8 and result["images"] == 2 * 3 * 16  # each view scored against every sample


def test_fsha_under_split_he_full_reads_only_ciphertexts(tmp_path):
    cfg = fsha_config("split-he-full", cut="pooled", epochs=1, optimizer="sgd", momentum=0.0, lr=0.01)
    settings = FSHASettings(observations=2, distractors=100, pretrain_steps=20)
    result = run_fsha(cfg, tmp_path, settings, log=lambda m: None)
    assert list(result["by_view"]) == ["activation ciphertexts read without the key: FSHA decoder"]
    view = result["by_view"]["activation ciphertexts read without the key: FSHA decoder"]
    assert view["leaked"] <= 1 and view["chance_p_value"] > 1e-3, view


def test_crafted_gradient_is_a_real_ciphertext_the_hospital_decrypts():
    """The split-he server's reply is made with the public key alone and decrypts, at the hospital, to its gradient."""
    secret = create_secret_context(PRESETS["default"])
    public = public_context_bytes(secret)
    head = torch.nn.Linear(96, 2)
    attack = FeatureSpaceHijacker(torch.nn.Identity(), (96,), torch.zeros(4, 1, 16, 16), SETTINGS)
    server = FSHAServer(attack, head, torch.optim.SGD(head.parameters(), lr=0.1), None, "he", public, 16)
    assert not server.has_secret_key()
    hospital = PackedLinearHE(96, 2, 16, engine_for(secret).slots)
    enc_g = EncryptedBatch.from_bytes(server.context, hospital.encrypt_logit_grads(secret, torch.zeros(5, 2)).to_bytes())
    grad = torch.randn(5, 96, generator=torch.Generator().manual_seed(0))
    reply = server._encrypt_grads(grad, enc_g)
    got = hospital.decrypt_activation_grads(secret, EncryptedBatch.from_bytes(secret, reply, "activation_grads", 5),
                                            dtype=torch.float64)
    assert (got - grad.double()).abs().max() < 1e-5
    eng = engine_for(load_public_context(public))
    values = np.arange(eng.slots, dtype=np.complex128) / eng.slots
    ct = public_encrypt(eng, values, eng.first_parms_id, eng.scale)
    assert np.abs(engine_for(secret).decrypt(ct) - values).max() < 1e-6


def test_the_hospitals_loss_guard_stops_a_plain_hijack_not_a_disguised_one(tmp_path):
    """split.loss_guard (hospital side): FSHA's zero logits keep the loss at log 2, so the hospitals stop at the first
    check (step 16), before the hijack; a server that also trains the honest head on the logit gradients it receives
    passes the check. The honest server passes it too."""
    cfg = fsha_config("split-plain")
    cfg.split.loss_guard_steps = 8
    naive = run_fsha(cfg, tmp_path / "naive", SETTINGS, log=lambda m: None)
    assert naive["refused"] and "split.loss_guard" in naive["refused"] and naive["hospital_steps"] == 16
    assert naive["leakage_rate"] <= 0.1, naive["by_view"]
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=4))  # past the guard's checks
    disguised = run_fsha(short, tmp_path / "disguised", dataclasses.replace(SETTINGS, disguise=True), log=lambda m: None)
    assert disguised["refused"] is None and disguised["hospital_steps"] == 32
    losses = disguised["loss_guard"]["step_losses"]
    assert np.mean(losses[-8:]) < 0.95 * np.mean(losses[:8])
    # the hijack itself is unchanged: the encoder gets FSHA's gradients either way (measured on real X-rays in
    # configs/attack/active.yaml, fsha-split-plain-guard-disguised)
    honest = MaliciousRun(malicious_config(cfg), tmp_path / "honest", honest_factory())
    honest.train(2, 0, lambda m: None)
    assert honest.steps == 16 and np.mean(honest.runner.loss_guard.losses[-8:]) < np.mean(honest.runner.loss_guard.losses[:8])
