"""Site partitions and stratified index helpers."""
from __future__ import annotations

import numpy as np
import pytest

from splitfl.config import PartitionConfig
from splitfl.data import (
    ArrayDataset,
    DataError,
    TaskInfo,
    partition_dataset,
    partition_indices,
    stratified_split,
    stratified_subset,
    summary_table,
)

TASK = TaskInfo("toy", "multiclass", ("a", "b", "c", "d"), 1)


def toy(n: int = 1000, sites: np.ndarray | None = None, seed: int = 0) -> ArrayDataset:
    """Tiny images with imbalanced labels (40/30/20/10 %)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
    images = rng.integers(0, 256, (n, 4, 4), dtype=np.uint8)
    return ArrayDataset(images, labels, TASK, sites)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(parts)
    assert len(flat) == n, "some index is missing or used twice"
    assert np.array_equal(np.sort(flat), np.arange(n))


def label_skew(ds: ArrayDataset, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between site label mixes and the global mix."""
    glob = ds.class_counts() / len(ds)
    dists = [0.5 * np.abs(np.bincount(ds.labels[p], minlength=4) / len(p) - glob).sum() for p in parts]
    return float(np.mean(dists))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity", "dirichlet_quantity"])
def test_every_index_used_once_and_repeatable(scheme: str) -> None:
    ds = toy()
    parts = partition_indices(ds, scheme, num_sites=5, alpha=0.5, seed=3, min_site_size=20)
    assert len(parts) == 5
    assert_exact_cover(parts, len(ds))
    assert all(len(p) >= 20 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    again = partition_indices(ds, scheme, num_sites=5, alpha=0.5, seed=3, min_site_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(ds, scheme, num_sites=5, alpha=0.5, seed=4, min_site_size=20)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_equal_sizes_and_mixed_labels() -> None:
    ds = toy()
    parts = partition_indices(ds, "iid", num_sites=3)
    assert sorted(len(p) for p in parts) == [333, 333, 334]
    assert label_skew(ds, parts) < 0.08


def test_dirichlet_skew_follows_alpha() -> None:
    ds = toy(2000)
    strong = partition_indices(ds, "dirichlet", num_sites=4, alpha=0.1, seed=0)
    weak = partition_indices(ds, "dirichlet", num_sites=4, alpha=100.0, seed=0)
    assert_exact_cover(strong, len(ds))
    assert label_skew(ds, strong) > 0.25
    assert label_skew(ds, weak) < 0.08


def test_quantity_skew_varies_sizes_not_labels() -> None:
    ds = toy(2000)
    parts = partition_indices(ds, "quantity", num_sites=4, alpha=0.3, seed=1, min_site_size=50)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 50 and sizes[-1] > 2 * sizes[0]
    assert label_skew(ds, [p for p in parts if len(p) >= 200]) < 0.1


def test_dirichlet_quantity_skews_labels_and_sizes() -> None:
    """Label skew as strong as plain dirichlet's, and site sizes that follow Dir(quantity_alpha) as well."""
    ds = toy(2000)
    spread = []
    for seed in range(5):
        parts = partition_indices(ds, "dirichlet_quantity", num_sites=6, alpha=0.5, seed=seed, min_site_size=20,
                                  quantity_alpha=0.3)
        assert_exact_cover(parts, len(ds))
        assert label_skew(ds, parts) > 0.15
        sizes = [len(p) for p in parts]
        spread.append(max(sizes) / min(sizes))
        even = partition_indices(ds, "dirichlet_quantity", num_sites=6, alpha=100.0, seed=seed, min_site_size=20,
                                 quantity_alpha=1000.0)
        assert label_skew(ds, even) < 0.08 and max(map(len, even)) < 1.3 * min(map(len, even))
    assert np.median(spread) > 4  # Dir(0.3) sizes: big and small hospitals
    with pytest.raises(DataError, match="quantity_alpha must be > 0"):
        partition_indices(ds, "dirichlet_quantity", num_sites=3, quantity_alpha=0.0)


def test_natural_sites() -> None:
    sites = np.array(["b", "a", "c", "a"] * 50)
    ds = toy(200, sites=sites)
    parts = partition_indices(ds, "natural", num_sites=3, min_site_size=10)
    assert [set(sites[p]) for p in parts] == [{"a"}, {"b"}, {"c"}]
    assert_exact_cover(parts, 200)
    with pytest.raises(DataError, match=r"num_sites is 4 but the data has 3 natural sites.*num_sites: 3"):
        partition_indices(ds, "natural", num_sites=4)
    with pytest.raises(DataError, match="fewer than partition.min_site_size"):
        partition_indices(ds, "natural", num_sites=3, min_site_size=60)
    with pytest.raises(DataError, match="needs a site id per image.*site"):
        partition_indices(toy(100), "natural", num_sites=2)


def test_impossible_requests_raise_clear_errors() -> None:
    ds = toy(100)
    with pytest.raises(DataError, match="unknown scheme 'label'"):
        partition_indices(ds, "label", 2)
    with pytest.raises(DataError, match="100 images cannot give 20 sites at least 10"):
        partition_indices(ds, "iid", 20)
    with pytest.raises(DataError, match="could not give all 10 sites at least 10 images.*raise partition.alpha"):
        partition_indices(ds, "dirichlet", 10, alpha=0.01, min_site_size=10)
    with pytest.raises(DataError, match="alpha must be > 0"):
        partition_indices(ds, "quantity", 2, alpha=0.0)
    with pytest.raises(DataError, match="num_sites"):
        partition_indices(ds, "iid", 0)


def test_partition_dataset_and_multilabel_single_labels() -> None:
    ds = toy(400)
    cfg = PartitionConfig(scheme="dirichlet", num_sites=3, alpha=1.0, seed=2, min_site_size=10)
    sites = partition_dataset(ds, cfg)
    assert sum(len(s) for s in sites) == 400
    assert all(isinstance(s, ArrayDataset) and s.task == TASK for s in sites)

    ml_task = TaskInfo("ml", "multilabel", ("x", "y", "z"), 1)
    rng = np.random.default_rng(0)
    ml = ArrayDataset(rng.integers(0, 256, (300, 4, 4), dtype=np.uint8), rng.integers(0, 2, (300, 3)), ml_task)
    parts = partition_indices(ml, "dirichlet", num_sites=3, alpha=0.5, seed=0)
    assert_exact_cover(parts, 300)


def test_summary_table_counts() -> None:
    ds = toy(500)
    parts = partition_indices(ds, "dirichlet", num_sites=3, alpha=0.5, seed=0)
    table = summary_table(ds, parts)
    lines = table.splitlines()
    assert lines[0].split() == ["site", "a", "b", "c", "d", "total"]
    assert [ln.split()[0:2] for ln in lines[2:5]] == [["site", "0"], ["site", "1"], ["site", "2"]]
    for ln, p in zip(lines[2:5], parts):
        assert ln.split()[2:] == [*map(str, np.bincount(ds.labels[p], minlength=4)), str(len(p))]
    assert lines[-1].split() == ["all", *map(str, ds.class_counts()), "500"]
    named = summary_table(ds, [ds.subset(p) for p in parts], site_names=["x", "y", "z"])
    assert named.splitlines()[2].split()[0] == "x"


def test_stratified_subset_and_split() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    sub = stratified_subset(labels, 50, seed=0)
    assert np.bincount(labels[sub]).tolist() == [30, 15, 5]
    assert np.array_equal(sub, stratified_subset(labels, 50, seed=0))
    assert not np.array_equal(sub, stratified_subset(labels, 50, seed=1))
    assert len(stratified_subset(labels, 500)) == 100
    with pytest.raises(DataError, match="max_train"):
        stratified_subset(labels, 0)

    parts = stratified_split(labels, (0.7, 0.15, 0.15), seed=0)
    assert_exact_cover(parts, 100)
    assert [len(p) for p in parts] == [70, 15, 15]
    assert [np.bincount(labels[p], minlength=3).tolist() for p in parts] == [[42, 21, 7], [9, 5, 1], [9, 4, 2]]
    with pytest.raises(DataError, match="add up to 1"):
        stratified_split(labels, (0.5, 0.2))
