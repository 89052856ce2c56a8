"""The split attacks on real recorded runs (synthetic 28 px chest X-rays, so they always run).

* split-plain with a shallow stage cut and a frozen public encoder: white-box inversion of the activations
  rebuilds the images (leaked, far above the mean image); the logit gradients give the labels away
  (Li et al.'s direction attack, AUC ~ 1);
* split-he: the activation and logit-gradient ciphertexts read without the key give nothing (no image
  leaked, label AUC near chance).
"""
from __future__ import annotations

import json

import pytest

from attacks.config import AttackConfig, AttackSettings
from attacks.harness import run_attacks
from splitfl.variants import Variant
from splitfl.config import DataConfig, ModelConfig, PartitionConfig, SplitConfig, TrainConfig


def attack_config(regime: str, steps: int, **model: object) -> AttackConfig:
    """One hospital, 64 training images in batches of 8, the first ``steps`` steps recorded and attacked."""
    return AttackConfig(
        seed=0,
        data=DataConfig(source="synthetic", modality="xray", n_train=64, n_val=64, n_test=100, size=28,
                        partition=PartitionConfig(scheme="iid", num_sites=1)),
        model=ModelConfig(**{"name": "test_resnet", "small_input_stem": True, "freeze_encoder": True, **model}),
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-3, optimizer="sgd", scheduler="none", progress=False,
                          accelerator="cpu"),
        split=SplitConfig(),
        variants=[Variant(name=regime, regime=regime)],
        attack=AttackSettings(iterations=100, max_observations=steps, distractors=100, decoder_epochs=5),
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("split-plain")
    (result,) = run_attacks(attack_config("split-plain", 4, cut="stage:1"), out, log=lambda _: None)
    return out, result


def test_split_plain_shallow_cut_whitebox_inversion_leaks(plain):
    out, result = plain
    white = result["by_view"]["activations (plaintext): white-box inversion"]
    assert white["images"] == 32
    assert white["leakage_rate"] >= 0.5
    assert white["ssim_mean"] >= white["mean_image_ssim_mean"] + 0.2
    assert "activations (plaintext): decoder" in result["by_view"]  # reported too, whatever it scores
    truth = [json.loads(line) for line in (out / "split-plain" / "run" / "transcript" / "ground_truth.jsonl").open()]
    assert [t["step"] for t in truth] == [0, 1, 2, 3] and all(len(t["indices"]) == 8 for t in truth)
    summary = (out / "leakage_summary.md").read_text()
    assert "white-box inversion" in summary and "direction attack" in summary


def test_split_plain_logit_gradients_give_the_labels_away(plain):
    labels = plain[1]["label_leakage"]
    assert labels["logit_grads_view"] == "logit gradients (plaintext)" and labels["n"] == 32
    assert labels["direction_auc"] >= 0.95
    assert labels["head_update_auc"] is None  # split-plain sends no head update


def test_split_he_keyless_reading_leaks_nothing(tmp_path):
    # A trainable encoder, so the (encrypted) logit gradients travel too; 6 steps = 48 images.
    (result,) = run_attacks(attack_config("split-he", 6, cut="pooled", freeze_encoder=False, small_input_stem=False), tmp_path,
                            log=lambda _: None)
    assert (tmp_path / "split-he" / "run" / "transcript" / "server_public_context.bin").is_file()
    views = result["by_view"]
    white = views["activation ciphertexts read without the key: white-box inversion"]
    decoded = views["activation ciphertexts read without the key: decoder"]
    assert white["images"] == decoded["images"] == 48
    assert white["leakage_rate"] == 0.0
    # The decoder turns noise into plausible X-rays: one may hit a patient by chance (1 in ~150 here), no more.
    assert decoded["leakage_rate"] <= 0.05 and decoded["reidentified_rate"] <= 0.1
    assert white["ssim_mean"] < 0.2
    assert decoded["ssim_mean"] < decoded["mean_image_ssim_mean"] + 0.05  # nothing beyond the average image
    assert views["head update (plaintext): white-box inversion"]["images"] == 48  # one image per step, reported
    labels = result["label_leakage"]
    assert labels["logit_grads_view"] == "logit-gradient ciphertexts read without the key" and labels["n"] == 48
    assert abs(labels["norm_auc"] - 0.5) < 0.25 and abs(labels["direction_auc"] - 0.5) < 0.25
    assert labels["head_update_n"] == 48 and labels["head_update_auc"] is not None


def test_split_he_full_keyless_reading_leaks_nothing(tmp_path):
    """split-he-full: activations, logit gradients and the head itself are ciphertexts; the same attacks get nothing."""
    cfg = attack_config("split-he-full", 4, cut="pooled", freeze_encoder=False, small_input_stem=False)
    cfg.train.momentum = 0.0  # the encrypted head trains by plain SGD
    (result,) = run_attacks(cfg, tmp_path, log=lambda _: None)
    views = result["by_view"]
    white = views["activation ciphertexts read without the key: white-box inversion"]
    decoded = views["activation ciphertexts read without the key: decoder"]
    assert white["images"] == decoded["images"] == 32
    assert white["leakage_rate"] == 0.0 and decoded["leakage_rate"] <= 0.05
    assert not any(v.startswith("head update") for v in views)  # no plaintext update exists to attack
    labels = result["label_leakage"]
    assert labels["logit_grads_view"] == "logit-gradient ciphertexts read without the key" and labels["n"] == 32
    assert abs(labels["norm_auc"] - 0.5) < 0.25 and abs(labels["direction_auc"] - 0.5) < 0.25
    assert labels["head_update_auc"] is None
