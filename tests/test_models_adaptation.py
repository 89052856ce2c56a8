"""How hospitals adapt the encoder: frozen (embeddings cached), the last N blocks tuned, or full fine-tuning.

Each adaptation trains exactly the parameters it names, in every regime; the cached-embedding path of the
plaintext regimes equals a hand-written linear probe on the same embeddings.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from lightning.fabric.utilities.seed import seed_everything
from test_train import tiny_config

from splitfl.config import ModelConfig
from splitfl.data import load_splits
from splitfl.fed.server import build_fed_model
from splitfl.models import ModelError, build_split_model, last_block_parameters
from splitfl.models.embeddings import encode_images
from splitfl.engine import epoch_loader
from splitfl.train import run


def _trainable(split) -> list[str]:
    return [n for n, p in split.encoder.named_parameters() if p.requires_grad]


def test_last_blocks_of_a_resnet_are_its_last_residual_blocks():
    split, _ = build_split_model(ModelConfig(name="resnet18", tune_last_blocks=1), 3, 1, 28)
    names = _trainable(split)
    assert names and all(n.startswith("body.layer4.1.") for n in names)
    assert len(names) == len(list(split.encoder.body.layer4[1].parameters()))
    split, _ = build_split_model(ModelConfig(name="resnet18", tune_last_blocks=3), 3, 1, 28)
    assert {n.split(".")[1] + "." + n.split(".")[2] for n in _trainable(split)} == {"layer3.1", "layer4.0", "layer4.1"}


def test_last_blocks_of_a_vit_bring_its_final_norm():
    cfg = ModelConfig(name="vit_tiny_patch16_224", tune_last_blocks=2, timm_kwargs={"patch_size": 4, "depth": 4})
    split, _ = build_split_model(cfg, 5, 3, 28)
    names = set(_trainable(split))
    assert {n.split(".")[1] for n in names} == {"blocks", "norm"}
    assert {n.split(".")[2] for n in names if ".blocks." in n} == {"2", "3"}
    assert {"body.norm.weight", "body.norm.bias"} <= names
    assert not split.encoder.body.cls_token.requires_grad and not split.encoder.body.pos_embed.requires_grad


def test_frozen_blocks_stay_in_eval_mode_while_the_tuned_ones_train():
    split, _ = build_split_model(ModelConfig(name="resnet18", tune_last_blocks=1), 3, 1, 28)
    split.train()
    body = split.encoder.body
    assert not body.bn1.training and not body.layer3[1].bn2.training and not body.layer4[0].bn1.training
    assert body.layer4[1].bn1.training and split.head.training
    before = body.layer2[0].bn1.running_mean.clone()
    split(torch.randn(4, 1, 28, 28))
    assert torch.equal(body.layer2[0].bn1.running_mean, before)  # a frozen BatchNorm does not drift


@pytest.mark.parametrize("n, match", [(0, ">= 1"), (9, "at most 8"), (100, "at most 8")])
def test_bad_block_counts_are_refused_with_the_limit(n, match):
    with pytest.raises(ModelError, match=match):
        build_split_model(ModelConfig(name="resnet18", tune_last_blocks=n), 3, 1, 28)


def test_frozen_and_last_blocks_together_are_refused():
    with pytest.raises(ModelError, match="choose one"):
        build_split_model(ModelConfig(name="resnet18", freeze_encoder=True, tune_last_blocks=1), 3, 1, 28)


def test_last_block_parameters_needs_timm_groups():
    with pytest.raises(ModelError, match="group_matcher"):
        last_block_parameters(torch.nn.Linear(2, 2), 1, set())


def test_frozen_centralized_run_is_a_linear_probe_on_cached_embeddings(tmp_path):
    """The cached path equals a hand-written probe: the same embeddings, batches and SGD steps in plain torch."""
    cfg = tiny_config()
    cfg.model.freeze_encoder = True
    cfg.train = dataclasses.replace(cfg.train, epochs=2, optimizer="sgd", lr=0.1, scheduler="none")
    run(cfg, tmp_path)
    released = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["runner"]["model"]

    seed_everything(cfg.seed, verbose=False)  # as the run seeds itself before building the model
    splits = load_splits(cfg.data)
    split, _ = build_split_model(cfg.model, splits.task.num_outputs, splits.task.n_channels, cfg.data.size)
    feats = encode_images(split.encoder, splits.train._x, 64, "cpu")
    head = torch.nn.Linear(feats.shape[1], splits.task.num_outputs)
    head.load_state_dict({k.split(".")[-1]: v.clone() for k, v in split.head.state_dict().items()})  # the run's initial head
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=cfg.train.momentum)
    data = torch.utils.data.TensorDataset(feats, splits.train._y)
    for epoch in range(2):
        for x, y in epoch_loader(data, cfg.train.batch_size, cfg.seed, epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x), y).backward()
            opt.step()
    head_keys = [k for k in released if k.startswith("head.")]
    got = torch.cat([released[k].flatten() for k in sorted(head_keys)])
    want = torch.cat([head.state_dict()[k.split(".")[-1]].flatten() for k in sorted(head_keys)])
    assert (got - want).abs().max() < 1e-5
    # the encoder did not move
    for k, v in split.encoder.state_dict().items():
        assert torch.equal(released["encoder." + k], v)


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["split-plain", "split-he", "split-he-full", "fedavg", "fedavg+he"])
@pytest.mark.parametrize("adaptation", ["frozen", "last1"])
def test_every_adaptation_trains_in_every_regime(tmp_path, regime, adaptation):
    """Frozen: the encoder never changes; last N blocks: only those change (and the head in both)."""
    cfg = tiny_config(regime="fedavg" if regime.startswith("fedavg") else regime)
    cfg.data = dataclasses.replace(cfg.data, n_train=64, n_val=32, n_test=32, size=16)
    cfg.train = dataclasses.replace(cfg.train, epochs=1, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.0)
    if regime == "fedavg+he":
        cfg.fed.secure = "he"
    if adaptation == "frozen":
        cfg.model.freeze_encoder = True
    else:
        cfg.model.tune_last_blocks = 1
    torch.manual_seed(0)
    metrics = run(cfg, tmp_path)
    assert 0.0 <= metrics["test"]["auroc_macro"] <= 1.0
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["runner"]
    state = trained["model"] if "model" in trained else None
    if state is None:  # split and fed runners keep their state under other names; best_model.pt holds the model
        state = torch.load(tmp_path / "best_model.pt", weights_only=False)["model"]
    seed_everything(cfg.seed, verbose=False)
    if regime.startswith("fedavg"):
        init = build_fed_model(cfg, 2, 1).state_dict()
    else:
        init = build_split_model(cfg.model, 2, 1, cfg.data.size)[0].state_dict()
    moved = {k for k in init if k in state and init[k].is_floating_point() and not torch.equal(init[k], state[k])}
    moved_encoder = {k for k in moved if k.startswith("encoder.") and "running_" not in k}
    assert any(k.startswith("head.") for k in moved)
    if adaptation == "frozen":
        assert not moved_encoder
    else:
        assert moved_encoder and all(".layer4.1." in k for k in moved_encoder), sorted(moved_encoder)[:5]
