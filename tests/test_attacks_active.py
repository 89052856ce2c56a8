"""``splitfl attack`` with ``attack.server: malicious`` (attacks.active): every variant's active attack run
against the hospitals' real code, one table, finished variants reused; wrong combinations refused before
anything trains.

Small: synthetic 16 px X-rays; the imprint variant is splitfl's LeNet behind the block (2 sites x 2 local
steps at batch 8), the label variant a tiny ResNet in split-plain.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from attacks.active import fingerprint, split_attack_overrides
from attacks.config import AttackConfig, AttackSettings, ImprintSettings, LabelSettings
from attacks.harness import run_attacks
from attacks.runtime import torch_threads
from splitfl.compare import compare
from splitfl.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, TrainConfig
from splitfl.variants import CompareError, Variant


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def active_config(variants: list[Variant], server: str = "malicious") -> AttackConfig:
    return AttackConfig(
        seed=0,
        data=DataConfig(source="synthetic", modality="xray", size=16, n_train=400, n_val=300, n_test=120,
                        partition=PartitionConfig(scheme="iid", num_sites=2)),
        model=ModelConfig(name="splitfl_lenet", cut="pooled"),
        train=TrainConfig(epochs=2, batch_size=8, lr=0.01, optimizer="sgd", momentum=0.9, scheduler="none",
                          progress=False, accelerator="cpu"),
        variants=variants,
        attack=AttackSettings(server=server),
        imprint=ImprintSettings(num_sites=2, local_steps=2, gain=0.03),
        labels=LabelSettings(observations=6),
    )


LABELS = Variant("labels-split-plain", "split-plain", {"model.name": "test_resnet", "model.small_input_stem": True,
                                                       "data.max_train": 96, "train.epochs": 1}, attack="labels")


def test_malicious_server_runs_each_variants_attack_and_tabulates_them(tmp_path: Path) -> None:
    cfg = active_config([Variant("imprint-fedavg-b8", "fedavg"), LABELS])  # imprint: the default for fedavg
    out = tmp_path / "active"
    rows = run_attacks(cfg, out, log=lambda *_: None)

    imprint, labels = rows
    assert (imprint["attack"], imprint["regime"], labels["attack"]) == ("imprint", "fedavg", "labels")
    assert imprint["leakage_rate"] > 0.5 > imprint["chance_leakage_rate"]  # the crafted model leaks the batch
    assert imprint["chance_p_value"] < 1e-6
    assert labels["label_accuracy"] == 1.0 and labels["label_p_value"] < 1e-3  # plaintext logit gradients
    for name in ("leakage_summary.md", "leakage_summary.csv", "leakage_summary.json", "leakage_summary.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "imprint-fedavg-b8" / "montage.png").is_file() and (out / "labels-split-plain" / "labels.json").is_file()
    table = (out / "leakage_summary.md").read_text()
    assert "| imprint-fedavg-b8 | imprint | fedavg |" in table and "labels 100%" in table
    assert json.loads((out / "leakage_summary.json").read_text())[0]["variant"] == "imprint-fedavg-b8"

    # A rerun reuses both finished variants; a changed setting reruns only the variant it concerns.
    logged: list[str] = []
    again = run_attacks(cfg, out, log=logged.append)
    assert again == rows and sum("reusing" in m for m in logged) == 2
    cfg.labels = LabelSettings(observations=4)
    logged.clear()
    third = run_attacks(cfg, out, log=logged.append)
    assert third[0] == rows[0] and sum("reusing" in m for m in logged) == 1 and third[1]["label_samples"] < labels["label_samples"]


@pytest.mark.parametrize("variant, problem", [
    (Variant("x", "fedavg", attack="fsha"), "the fsha attack runs on split-plain"),
    (Variant("x", "split-he", attack="imprint"), "the imprint attack runs on fedavg"),
    (Variant("x", "fedavg", attack="gradients"), "not an active attack"),
    (Variant("x", "centralized"), "not an active attack"),
    (Variant("x", "fedavg", {"fed.secure": "he", "fed.dp_noise_multiplier": 1.0}), "one at a time"),
])
def test_wrong_combinations_are_refused_before_anything_trains(tmp_path: Path, variant: Variant, problem: str) -> None:
    with pytest.raises(CompareError, match=problem):
        run_attacks(active_config([Variant("fine", "fedavg"), variant]), tmp_path, log=lambda *_: None)
    assert not any(tmp_path.iterdir())


def test_an_attack_key_needs_the_malicious_server(tmp_path: Path) -> None:
    with pytest.raises(CompareError, match="attack.server: malicious"):
        run_attacks(active_config([LABELS], server="curious"), tmp_path, log=lambda *_: None)
    with pytest.raises(CompareError, match="attack.server=.*choose curious"):
        run_attacks(active_config([LABELS], server="evil"), tmp_path, log=lambda *_: None)
    with pytest.raises(CompareError, match="only `splitfl attack` reads"):
        compare(active_config([LABELS]), tmp_path, log=lambda *_: None)


def test_a_variant_sets_its_own_attack_settings(tmp_path: Path) -> None:
    """imprint.* / fsha.* / labels.* overrides go to the attack's settings, checked before anything trains."""
    cfg = active_config([Variant("honest", "fedavg", {"imprint.honest": True, "train.lr": 0.02}),
                         Variant("plain", "fedavg")])
    stripped, settings = split_attack_overrides(cfg)
    assert stripped.variants[0].overrides == {"train.lr": 0.02} and settings == {"honest": {"imprint": {"honest": True}},
                                                                                  "plain": {}}
    with pytest.raises(CompareError, match="'imprint.honset' is not a setting of the imprint attack"):
        run_attacks(active_config([Variant("x", "fedavg", {"imprint.honset": True})]), tmp_path, log=lambda *_: None)
    with pytest.raises(CompareError, match="runs the imprint attack but overrides fsha settings"):
        run_attacks(active_config([Variant("x", "fedavg", {"fsha.disguise": True})]), tmp_path, log=lambda *_: None)
    assert not any(tmp_path.iterdir())


def test_the_fingerprint_ignores_settings_left_at_their_defaults() -> None:
    base = fingerprint("imprint", RunConfig(regime="fedavg"), ImprintSettings())
    assert fingerprint("imprint", RunConfig(regime="fedavg"), ImprintSettings(honest=False)) == base
    assert fingerprint("imprint", RunConfig(regime="fedavg"), ImprintSettings(honest=True)) != base
    changed = RunConfig(regime="fedavg")
    changed.train.lr = 0.5
    assert fingerprint("imprint", changed, ImprintSettings()) != base
