"""splitfl attack on FedAvg: real runs recorded, attacked from the server's view, scored on the ground truth."""
from __future__ import annotations

import json

import numpy as np
import pytest

from attacks.config import AttackConfig, AttackSettings
from attacks.harness import run_attacks
from splitfl.runs.transcript import TranscriptError, read_transcript
from splitfl.variants import Variant
from splitfl.config import DataConfig, FedConfig, ModelConfig, PartitionConfig, TrainConfig


def attack_config(*variants: Variant, iterations: int = 300) -> AttackConfig:
    """Synthetic X-rays, 2 sites, the sigmoid LeNet, one SGD step per round at batch 1: FedSGD."""
    return AttackConfig(
        seed=0,
        data=DataConfig(source="synthetic", modality="xray", n_train=64, n_val=32, n_test=120, size=16, n_channels=1,
                        partition=PartitionConfig(scheme="iid", num_sites=2)),
        model=ModelConfig(name="splitfl_lenet"),
        train=TrainConfig(epochs=1, batch_size=1, lr=0.01, optimizer="sgd", momentum=0.0, scheduler="none",
                          progress=False, accelerator="cpu"),
        fed=FedConfig(local_steps=1),
        variants=list(variants),
        attack=AttackSettings(iterations=iterations, max_observations=2, distractors=100),
    )


@pytest.mark.slow
def test_fedavg_updates_leak_and_encrypted_updates_do_not(tmp_path):
    cfg = attack_config(Variant("plain", "fedavg"), Variant("he", "fedavg", {"fed.secure": "he"}))
    results = {r["variant"]: r for r in run_attacks(cfg, tmp_path, log=lambda _: None)}
    plain, he = results["plain"], results["he"]
    assert plain["views"] == ["plaintext update"] and plain["images"] == 2
    assert plain["leakage_rate"] == 1.0 and plain["ssim_mean"] > 0.8 and plain["label_accuracy"] == 1.0
    # The attack ran on the ciphertexts as the server reads them; it got noise.
    assert he["views"] == ["ciphertexts read without the key"] and he["images"] == 2
    assert he["leakage_rate"] == 0.0 and abs(he["ssim_mean"]) < 0.2
    # Chance level: two real leaks are not luck (p = chance rate^2 at most); no leak needs no luck (p = 1).
    assert plain["chance_leakage_rate"] <= 1 / 100 and plain["chance_p_value"] < 1e-4
    assert he["chance_p_value"] == 1.0
    for name in ("plain", "he"):
        saved = json.loads((tmp_path / name / "leakage.json").read_text())
        assert len(saved["per_image"]) == 2 and (tmp_path / name / "montage.png").stat().st_size > 0
        assert saved["leakage_vs_margin"][0][0] == 0.0
    table = (tmp_path / "leakage_summary.md").read_text()
    assert "| plain | fedavg | plaintext update | 2 | 100% | " in table and "| he | fedavg |" in table
    assert "By chance" in table or "by chance" in table
    # A second call reuses the recorded runs (no retraining) and scores the same.
    again = {r["variant"]: r for r in run_attacks(cfg, tmp_path, log=lambda _: None)}
    assert again["plain"]["leakage_rate"] == 1.0


def test_keyless_reading_of_an_encrypted_update_is_unrelated_to_it():
    from attacks.keyless import encrypted_update_readout
    from splitfl.he import PRESETS, create_secret_context
    from splitfl.he.aggregation import encrypt_update
    from splitfl.he.keys import public_context_bytes

    ctx = create_secret_context(PRESETS["aggregation"])
    update = np.random.default_rng(0).normal(scale=0.01, size=20_000)
    reading = encrypted_update_readout(encrypt_update(ctx, update, 3.0), public_context_bytes(ctx), update.size)
    assert reading.shape == update.shape
    assert abs(np.corrcoef(reading, update)[0, 1]) < 0.05  # uniform mod q: no linear trace of the update
    assert np.abs(reading).mean() > 1e3 * np.abs(update).mean()


def test_a_folder_without_a_transcript_says_how_to_record_one(tmp_path):
    with pytest.raises(TranscriptError, match="fed.transcript: true"):
        read_transcript(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "index.jsonl").write_text(json.dumps({"step": 0, "kind": "global_model", "file": "x.bin", "bytes": 3}) + "\n")
    with pytest.raises(TranscriptError, match="missing"):
        read_transcript(tmp_path)


def test_too_few_distractors_and_unattackable_regimes_are_refused(tmp_path):
    from splitfl.variants import CompareError

    cfg = attack_config(Variant("central", "centralized"))
    with pytest.raises(CompareError, match="no server to attack"):
        run_attacks(cfg, tmp_path)
    cfg = attack_config(Variant("plain", "fedavg"))
    cfg.attack.distractors = 20
    with pytest.raises(CompareError, match="at least 100"):
        run_attacks(cfg, tmp_path)


def test_several_messages_of_one_kind_in_a_step_are_all_kept(tmp_path):
    """A Poisson batch above the packed capacity travels in parts: none may overwrite another."""
    from splitfl.transcript import TranscriptRecorder

    rec = TranscriptRecorder(tmp_path, max_steps=2, meta={"config": {}})
    rec.record("activations_in", b"first part")
    rec.record("activations_in", b"second, longer part")
    rec.record("head_update_in", b"update")
    rec.next_step()
    transcript = read_transcript(tmp_path)  # sizes in the index match the files (no torn write)
    assert transcript.messages(0, "activations_in") == [b"first part", b"second, longer part"]
    assert transcript.payload(0, "activations_in") == b"first part"
    assert transcript.messages(0, "head_update_in") == [b"update"]
