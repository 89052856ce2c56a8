"""Synthetic modalities: repeatable, balanced, and labelled by spatial structure only."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn

from splitfl.config import DataConfig
from splitfl.data import DataError, load_splits, make_synthetic
from splitfl.data.synthetic import MODALITIES, TASKS

EXPECTED = {
    "xray": ("binary", 1, ("normal", "pneumonia")),
    "fundus": ("ordinal", 3, ("no DR", "mild", "moderate", "severe", "proliferative")),
    "histology": ("multiclass", 3, ("adipose", "lymphocytes", "stroma", "tumor")),
}


def _auroc(labels: np.ndarray, proba: np.ndarray) -> float:
    if proba.shape[1] == 2:
        return roc_auc_score(labels, proba[:, 1])
    return roc_auc_score(labels, proba, multi_class="ovr")


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", [28, 64])
def test_shapes_task_and_balance(modality: str, size: int) -> None:
    splits = make_synthetic(modality, 50, 20, 30, size=size, seed=3)
    task_type, channels, names = EXPECTED[modality]
    assert splits.task.task_type == task_type
    assert splits.task.label_names == names
    assert splits.task.name == f"synthetic-{modality}"
    for ds, n in ((splits.train, 50), (splits.val, 20), (splits.test, 30)):
        assert ds.images.shape == (n, size, size, channels)
        assert ds.images.dtype == np.uint8
        counts = ds.class_counts()
        assert counts.max() - counts.min() <= 1, counts  # balanced
    # Images use the dynamic range and are not constant.
    assert splits.train.images.std() > 20


@pytest.mark.parametrize("modality", MODALITIES)
def test_deterministic_given_seed(modality: str) -> None:
    a = make_synthetic(modality, 40, 10, 10, seed=7)
    b = make_synthetic(modality, 40, 10, 10, seed=7)
    c = make_synthetic(modality, 40, 10, 10, seed=8)
    for split in ("train", "val", "test"):
        da, db = getattr(a, split), getattr(b, split)
        assert da.images.tobytes() == db.images.tobytes()
        assert da.labels.tobytes() == db.labels.tobytes()
    assert a.train.images.tobytes() != c.train.images.tobytes()


def test_val_and_test_do_not_depend_on_train_size() -> None:
    small = make_synthetic("xray", 20, 15, 15, seed=1)
    large = make_synthetic("xray", 90, 15, 15, seed=1)
    assert small.val.images.tobytes() == large.val.images.tobytes()
    assert small.test.images.tobytes() == large.test.images.tobytes()


@pytest.mark.parametrize("modality", MODALITIES)
def test_global_intensity_and_colour_are_not_predictive(modality: str) -> None:
    """A classifier on per-image channel means must be near chance: the signal is spatial."""
    splits = make_synthetic(modality, 1500, 10, 1000, seed=11)

    def feats(ds) -> np.ndarray:
        return ds.images.mean(axis=(1, 2)) / 255.0

    clf = LogisticRegression(max_iter=2000).fit(feats(splits.train), splits.train.labels)
    auroc = _auroc(splits.test.labels, clf.predict_proba(feats(splits.test)))
    assert auroc < 0.65, f"{modality}: channel means predict the label (AUROC {auroc:.3f})"
    # A single threshold on overall brightness must not work either.
    brightness = feats(splits.test).mean(axis=1)
    for c in range(splits.task.num_outputs):
        one_vs_rest = roc_auc_score(splits.test.labels == c, brightness)
        assert 0.35 < one_vs_rest < 0.65, (modality, c, one_vs_rest)


def _tiny_cnn(in_ch: int, n_out: int, width: int = 8) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(in_ch, width), *block(width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 4 * width), nn.MaxPool2d(2), *block(4 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, n_out),
    )


@pytest.fixture
def one_thread():
    """One torch thread: small convs gain nothing from more, and it avoids thrashing a busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("modality", MODALITIES)
def test_structure_is_learnable_by_a_small_cnn(modality: str, one_thread: None) -> None:
    """Two epochs of a 4-layer CNN on 2000 images must clearly beat chance (~2 s each)."""
    splits = make_synthetic(modality, 2000, 10, 600, size=28, seed=5)
    torch.manual_seed(0)
    net = _tiny_cnn(splits.task.n_channels, splits.task.num_outputs)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(2):
        order = torch.randperm(len(splits.train), generator=gen)
        for batch in order.split(32):
            x, y = splits.train[batch]
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        x_test, _ = splits.test[torch.arange(len(splits.test))]
        proba = torch.softmax(net(x_test), dim=1).numpy()
    auroc = _auroc(splits.test.labels, proba)
    assert auroc > 0.75, f"{modality}: small CNN reached only AUROC {auroc:.3f}"


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    make_synthetic("xray", 3000, 1, 1, size=28, seed=0)
    elapsed = time.perf_counter() - start
    # Typically ~1 s on 2 cores; the bound leaves room for a busy CI machine.
    assert elapsed < 8.0, f"3000 x-ray images took {elapsed:.1f}s"


def test_bad_arguments_raise_data_error() -> None:
    with pytest.raises(DataError, match="modality.*xray"):
        make_synthetic("mri", 10, 10, 10)
    with pytest.raises(DataError, match="n_train"):
        make_synthetic("xray", 0, 10, 10)
    with pytest.raises(DataError, match="size"):
        make_synthetic("xray", 10, 10, 10, size=8)


def test_tasks_table_matches_channels() -> None:
    for modality, task in TASKS.items():
        assert task.n_channels == EXPECTED[modality][1]


def test_load_splits_synthetic_applies_max_train() -> None:
    cfg = DataConfig(source="synthetic", modality="fundus", n_train=100, n_val=10, n_test=10, max_train=40, seed=2)
    splits = load_splits(cfg)
    assert splits.task.name == "synthetic-fundus"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 10)
    assert splits.train.class_counts().tolist() == [8, 8, 8, 8, 8]
