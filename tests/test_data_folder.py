"""Image folders described by a CSV manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitfl.config import DataConfig
from splitfl.data import DataError, load_folder, load_splits, partition_indices


def make_folder(
    root: Path,
    labels: list[str],
    extra: dict[str, list[str]] | None = None,
    image_size: int = 20,
    mode: str = "RGB",
    fmt: str = "png",
) -> Path:
    """Write one image per label (pixel value encodes the row) and a manifest.csv."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    header = ["path", "label", *extra]
    lines = [",".join(header)]
    for i, label in enumerate(labels):
        rel = f"img/{i:03d}.{fmt}"
        value = (i * 7) % 256
        Image.new(mode, (image_size, image_size + 4), color=value if mode == "L" else (value, 10, 200)).save(root / rel)
        lines.append(",".join([rel, label, *(col[i] for col in extra.values())]))
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_class_names_inferred_and_stratified_split(tmp_path: Path) -> None:
    labels = ["cat"] * 40 + ["dog"] * 20
    manifest = make_folder(tmp_path, labels)
    splits = load_folder(manifest, n_channels=3, size=16, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert splits.task.task_type == "binary"
    assert splits.task.label_names == ("cat", "dog")
    assert splits.train.images.shape == (30, 16, 16, 3)
    assert splits.train.class_counts().tolist() == [20, 10]
    assert splits.val.class_counts().tolist() == [10, 5]
    assert splits.test.class_counts().tolist() == [10, 5]
    # Rows are used once across the three splits (the red channel encodes the row).
    seen = np.concatenate([s.images[:, 0, 0, 0] for s in (splits.train, splits.val, splits.test)])
    assert sorted(seen.tolist()) == sorted(((np.arange(60) * 7) % 256).tolist())
    again = load_folder(manifest, size=16, val_fraction=0.25, test_fraction=0.25, seed=0)
    other = load_folder(manifest, size=16, val_fraction=0.25, test_fraction=0.25, seed=1)
    assert again.train.images.tobytes() == splits.train.images.tobytes()
    assert other.train.images.tobytes() != splits.train.images.tobytes()


def test_integer_labels_given_names_grey_and_jpeg(tmp_path: Path) -> None:
    labels = [str(i % 3) for i in range(30)]
    manifest = make_folder(tmp_path, labels, mode="L", fmt="jpg")
    splits = load_folder(manifest, label_names=["a", "b", "c"], n_channels=1, size=12, seed=0)
    assert splits.task.task_type == "multiclass"
    assert splits.task.label_names == ("a", "b", "c")
    assert splits.train.images.shape[1:] == (12, 12, 1)
    total = sum(s.class_counts() for s in (splits.train, splits.val, splits.test))
    assert total.tolist() == [10, 10, 10]


def test_numeric_names_sort_numerically(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path, ["10", "2", "1"] * 4)
    splits = load_folder(manifest, task_type="ordinal", size=8, val_fraction=0.25, test_fraction=0.25)
    assert splits.task.label_names == ("1", "2", "10")
    assert splits.task.task_type == "ordinal"


def test_split_and_site_columns(tmp_path: Path) -> None:
    n = 24
    labels = ["neg", "pos"] * (n // 2)
    split = ["train"] * 16 + ["val"] * 4 + ["TEST"] * 4
    site = [f"hosp{i % 2}" for i in range(n)]
    manifest = make_folder(tmp_path, labels, {"site": site, "split": split})
    splits = load_folder(manifest, size=8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 4)
    assert splits.train.sites is not None
    assert sorted(set(splits.train.sites.tolist())) == ["hosp0", "hosp1"]
    parts = partition_indices(splits.train, "natural", num_sites=2, min_site_size=1)
    assert [len(p) for p in parts] == [8, 8]
    assert set(splits.train.sites[parts[0]].tolist()) == {"hosp0"}


def test_multilabel_pipe_separated(tmp_path: Path) -> None:
    labels = ["effusion|mass", "", "mass", "nodule", "effusion"] * 4
    manifest = make_folder(tmp_path, labels)
    splits = load_folder(manifest, task_type="multilabel", size=8, val_fraction=0.2, test_fraction=0.2)
    assert splits.task.label_names == ("effusion", "mass", "nodule")
    all_labels = np.concatenate([s.labels for s in (splits.train, splits.val, splits.test)])
    assert all_labels.shape == (20, 3)
    assert all_labels.sum(axis=0).tolist() == [8, 8, 4]
    assert (all_labels.sum(axis=1) == 0).sum() == 4


def test_load_splits_dispatch_and_max_train(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path, ["x", "y"] * 30)
    cfg = DataConfig(source="folder", manifest=str(manifest), size=8, max_train=10)
    splits = load_splits(cfg)
    assert len(splits.train) == 10 and splits.train.class_counts().tolist() == [5, 5]
    assert len(splits.val) == 9


# --------------------------------------------------------------------------- errors


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found.*nope.csv"):
        load_folder(tmp_path / "nope.csv")


def test_missing_columns(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['path', 'label'\].*found \['file', 'class'\]"):
        load_folder(tmp_path / "m.csv")


def test_missing_image_names_row_and_path(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path, ["a", "b", "a", "b"])
    (tmp_path / "img" / "002.png").unlink()
    with pytest.raises(DataError, match=r"line 4: image not found: .*img/002.png"):
        load_folder(manifest)


def test_unreadable_image(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path, ["a", "b", "a", "b"])
    (tmp_path / "img" / "001.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"line 3: cannot read image .*001.png"):
        load_folder(manifest)


def test_unknown_label_name(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path, ["cat", "dog", "cow", "dog"])
    with pytest.raises(DataError, match=r"line 4: unknown label 'cow'; known labels are \['cat', 'dog'\]"):
        load_folder(manifest, label_names=["cat", "dog"])
    with pytest.raises(DataError, match=r"line 2: unknown label '5'"):
        load_folder(make_folder(tmp_path / "b", ["5", "0"]), label_names=["cat", "dog"])


def test_bad_split_values_and_empty_split(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path, ["a", "b"] * 3, {"split": ["train", "train", "val", "valid", "test", "test"]})
    with pytest.raises(DataError, match=r"bad values \(line, value\): \[\(5, 'valid'\)\]"):
        load_folder(manifest)
    manifest = make_folder(tmp_path / "c", ["a", "b"] * 2, {"split": ["train", "train", "test", "test"]})
    with pytest.raises(DataError, match=r"no images for split\(s\) \['val'\]"):
        load_folder(manifest)


def test_single_class_is_rejected(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path, ["a"] * 5)
    with pytest.raises(DataError, match="only 1 class"):
        load_folder(manifest)


def test_folder_source_needs_manifest() -> None:
    with pytest.raises(DataError, match="data.manifest"):
        load_splits(DataConfig(source="folder"))
