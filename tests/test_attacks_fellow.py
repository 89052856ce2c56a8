"""The curious fellow hospital in split learning: the relayed encoder, recorded and attacked.

* which hand-overs a hospital sees, and which steps each difference spans (2 and 3 hospitals);
* the relay a real split-plain run records is the exact SGD step of the other hospital's batch,
  checked against the same step in plaintext torch autograd;
* end to end on synthetic X-rays: the receiving hospital rebuilds the other hospital's images
  from the encoder difference, while the server's headline is unaffected.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from attacks.fellow_inversion import VIEW_RELAY, read_relay, relay_observations
from attacks.config import AttackConfig, AttackSettings
from attacks.harness import run_attacks
from splitfl.variants import Variant
from splitfl.config import DataConfig, ModelConfig, PartitionConfig, SplitConfig, TrainConfig


def _rows(sites: list[int]) -> tuple[torch.Tensor, list[dict], dict[int, torch.Tensor]]:
    rows = [{"step": k, "site": s, "lr": 0.1, "file": f"{k:06d}.bin"} for k, s in enumerate(sites)]
    return torch.zeros(3), rows, {k: torch.full((3,), float(k + 1)) for k in range(len(sites))}


def test_two_hospitals_each_hand_over_spans_exactly_the_other_hospitals_step():
    initial, rows, weights = _rows([0, 1, 0, 1])
    obs = relay_observations(initial, rows, weights)
    assert [(o.receiver, o.steps) for o in obs] == [(1, [0]), (0, [1]), (1, [2])]
    assert torch.equal(obs[0].before, initial) and torch.equal(obs[0].after, weights[0])
    assert torch.equal(obs[1].before, weights[0]) and torch.equal(obs[1].after, weights[1])  # hospital 0 sent step 0 on
    assert torch.equal(obs[2].before, weights[1]) and torch.equal(obs[2].after, weights[2])


def test_three_hospitals_see_the_sum_of_the_two_others():
    initial, rows, weights = _rows([0, 1, 2, 0, 1, 2])
    obs = relay_observations(initial, rows, weights)
    assert [(o.receiver, o.steps) for o in obs] == [(1, [0]), (2, [0, 1]), (0, [1, 2]), (1, [2, 3]), (2, [3, 4])]
    assert torch.equal(obs[2].before, weights[0])  # hospital 0's own step 0, then steps 1 and 2 of the others


def test_consecutive_steps_of_one_hospital_are_not_a_hand_over():
    initial, rows, weights = _rows([0, 1, 1, 0])
    assert [(o.receiver, o.steps) for o in relay_observations(initial, rows, weights)] == [(1, [0]), (0, [1, 2])]


def fellow_config(regime: str, steps: int, iterations: int = 2000) -> AttackConfig:
    """Two hospitals, a trainable sigmoid LeNet encoder (cut after its convolutions), batch 1, plain SGD."""
    return AttackConfig(
        seed=0,
        data=DataConfig(source="synthetic", modality="xray", n_train=32, n_val=64, n_test=100, size=28,
                        partition=PartitionConfig(scheme="iid", num_sites=2)),
        model=ModelConfig(name="splitfl_lenet", freeze_encoder=False, cut="pooled"),
        train=TrainConfig(epochs=1, batch_size=1, lr=0.01, optimizer="sgd", momentum=0.0, scheduler="none",
                          progress=False, accelerator="cpu"),
        split=SplitConfig(),
        variants=[Variant(name=regime, regime=regime)],
        attack=AttackSettings(iterations=50, max_observations=steps, distractors=100, decoder_epochs=2,
                              split_attack="whitebox", fellow_iterations=iterations),
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("fellow")
    (result,) = run_attacks(fellow_config("split-plain", 4), out, log=lambda _: None)
    return out / "split-plain" / "run", result


def test_relay_is_the_other_hospitals_exact_sgd_step(plain):
    """weights sent on after step 0 = initial - lr * dL/d(encoder) of step 0's batch, in plaintext torch."""
    from attacks.fellow_inversion import load_flat
    from splitfl.config import run_config_from_dict
    from splitfl.data import load_splits, partition_dataset
    from splitfl.models import build_split_model

    run_dir, _ = plain
    cfg = run_config_from_dict(json.loads((run_dir / "transcript" / "meta.json").read_text())["config"])
    initial, rows, weights = read_relay(run_dir / "relay")
    assert [r["site"] for r in rows] == [0, 1, 0, 1] and len(weights) == 4
    truth = [json.loads(line) for line in (run_dir / "transcript" / "ground_truth.jsonl").open()]
    site, indices = truth[0]["site"], truth[0]["indices"]
    splits = load_splits(cfg.data)
    images, labels = partition_dataset(splits.train, cfg.data.partition)[site][torch.tensor(indices)]

    torch.manual_seed(cfg.seed)  # the model exactly as the run built it
    model, _ = build_split_model(cfg.model, splits.task.num_outputs, splits.task.n_channels, cfg.data.size)
    load_flat(model.encoder, initial)
    model.train()
    loss = F.cross_entropy(model.head(model.encoder(images)), labels.long().view(-1))
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    expected = initial - cfg.train.lr * grad
    assert torch.allclose(weights[0], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(weights[0], initial, atol=1e-6)  # a real step, not a copy


def test_fellow_hospital_rebuilds_the_other_hospitals_images(plain):
    _, result = plain
    view = result["by_view"][VIEW_RELAY]
    assert view["images"] == 3  # 4 recorded steps: 3 hand-overs of one image each
    assert result["fellow_view"] == VIEW_RELAY
    assert result["fellow_leakage_rate"] == view["leakage_rate"]
    assert view["ssim_mean"] >= view["mean_image_ssim_mean"] + 0.1
    assert view["leakage_rate"] >= 2 / 3
    assert not result["worst_view"].startswith("fellow")  # the server's headline stays the server's
