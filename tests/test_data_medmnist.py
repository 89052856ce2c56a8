"""MedMNIST files: real PneumoniaMNIST when present, small fake files for every failure mode."""
from __future__ import annotations

import io
from pathlib import Path

import medmnist
import numpy as np
import pytest

from splitfl.config import MEDMNIST_DIR_ENV, DataConfig
from splitfl.data import (
    DataError,
    load_medmnist,
    load_splits,
    medmnist_task,
    resolve_medmnist_root,
    supported_flags,
)
from splitfl.data.medmnist_files import medmnist_filename


def write_fake(
    folder: Path,
    flag: str,
    size: int = 28,
    n_channels: int = 1,
    n_label_cols: int = 1,
    n_classes: int = 2,
    n: int = 12,
    seed: int = 0,
    filename: str | None = None,
    **overrides: np.ndarray,
) -> Path:
    """A tiny file in MedMNIST's layout (uint8 images, (n, L) uint8 labels)."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if n_channels == 1 else (size, size, n_channels)
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        if n_label_cols == 1:
            labels = (np.arange(n) % n_classes)[:, None]
        else:
            labels = rng.integers(0, 2, (n, n_label_cols))
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    arrays.update(overrides)
    path = folder / (filename or medmnist_filename(flag, size))
    np.savez_compressed(path, **arrays)
    return path


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_pneumoniamnist_official_splits(medmnist_dir: Path) -> None:
    if not (medmnist_dir / "pneumoniamnist.npz").is_file():
        pytest.skip(f"pneumoniamnist.npz not in {medmnist_dir}")
    splits = load_medmnist("pneumoniamnist", str(medmnist_dir))
    assert splits.task.task_type == "binary"
    assert splits.task.label_names == ("normal", "pneumonia")
    assert splits.task.n_channels == 1
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4708, 524, 624)
    assert splits.train.class_counts().tolist() == [1214, 3494]
    assert splits.val.class_counts().tolist() == [135, 389]
    assert splits.test.class_counts().tolist() == [234, 390]
    assert splits.train.images.shape == (4708, 28, 28, 1)
    assert splits.train.images.dtype == np.uint8
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0

    sub = load_medmnist("pneumoniamnist", str(medmnist_dir), max_train=500, seed=1)
    assert len(sub.train) == 500 and len(sub.test) == 624
    # Stratified: class shares of the full training split are kept (to rounding).
    assert abs(sub.train.class_counts()[0] - 500 * 1214 / 4708) <= 1
    again = load_medmnist("pneumoniamnist", str(medmnist_dir), max_train=500, seed=1)
    other = load_medmnist("pneumoniamnist", str(medmnist_dir), max_train=500, seed=2)
    assert again.train.images.tobytes() == sub.train.images.tobytes()
    assert other.train.images.tobytes() != sub.train.images.tobytes()


# --------------------------------------------------------------------------- metadata


@pytest.mark.realdata
def test_real_retinamnist_is_the_official_file(medmnist_dir: Path) -> None:
    """The MD5 of the official RetinaMNIST file equals the one medmnist's metadata lists; a changed byte is caught."""
    if not (medmnist_dir / "retinamnist.npz").is_file():
        pytest.skip("retinamnist.npz not in the real MedMNIST folder")
    splits = load_medmnist("retinamnist", medmnist_dir, md5_check="strict")
    assert splits.meta["official"] is True and splits.meta["md5"] == medmnist.INFO["retinamnist"]["MD5"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1080, 120, 400)


def test_md5_mismatch_warns_or_is_refused(tmp_path: Path) -> None:
    """A file that is not the published one: a warning by default, an error under strict, nothing when off."""
    write_fake(tmp_path, "retinamnist", n_channels=3, n_classes=5)
    with pytest.warns(UserWarning, match="MD5 .* differs from the one medmnist's metadata lists for retinamnist"):
        splits = load_medmnist("retinamnist", tmp_path)
    assert splits.meta["official"] is False
    assert splits.meta["official_md5"] == medmnist.INFO["retinamnist"]["MD5"]
    with pytest.raises(DataError, match="not the published file"):
        load_medmnist("retinamnist", tmp_path, md5_check="strict")
    assert load_medmnist("retinamnist", tmp_path, md5_check="off").meta["official"] is None


def test_pathmnist_missing_is_a_clear_error_naming_the_download(tmp_path: Path) -> None:
    """PathMNIST cannot be had here: the real path still names the file, the folder and medmnist's downloader."""
    with pytest.raises(DataError, match=r"pathmnist\.npz.*download_medmnist\('pathmnist'"):
        load_medmnist("pathmnist", tmp_path)


def test_every_supported_flag_has_a_task() -> None:
    flags = supported_flags()
    for flag in ("retinamnist", "pathmnist", "pneumoniamnist", "chestmnist", "octmnist", "dermamnist", "bloodmnist"):
        assert flag in flags
    assert not any(f.endswith("3d") for f in flags)
    for flag in flags:
        task = medmnist_task(flag)
        assert task.num_outputs == len(medmnist.INFO[flag]["label"])
    assert medmnist_task("retinamnist").task_type == "ordinal"
    assert medmnist_task("chestmnist").task_type == "multilabel"
    assert medmnist_task("pathmnist").task_type == "multiclass"
    assert medmnist_task("pathmnist").label_names[0] == "adipose"


def test_file_names_agree_with_medmnist_classes(tmp_path: Path) -> None:
    """medmnist's own dataset class must find the files where we look for them."""
    write_fake(tmp_path, "pathmnist", size=64, n_channels=3, n_classes=9, n=4)
    ds = medmnist.PathMNIST(split="val", root=str(tmp_path), size=64, download=False)
    assert ds.imgs.shape == (4, 64, 64, 3)
    assert medmnist_filename("pneumoniamnist", 28) == "pneumoniamnist.npz"
    assert medmnist_filename("pathmnist", 224) == "pathmnist_224.npz"


# --------------------------------------------------------------------------- fake files, good


def test_ordinal_retinamnist(tmp_path: Path) -> None:
    write_fake(tmp_path, "retinamnist", n_channels=3, n_classes=5, n=15)
    splits = load_medmnist("retinamnist", str(tmp_path))
    assert splits.task.task_type == "ordinal"
    assert splits.task.num_outputs == 5
    assert splits.train.images.shape == (15, 28, 28, 3)
    assert splits.train.class_counts().tolist() == [3, 3, 3, 3, 3]


def test_multilabel_chestmnist(tmp_path: Path) -> None:
    write_fake(tmp_path, "chestmnist", n_label_cols=14, n=10)
    splits = load_medmnist("chestmnist", str(tmp_path))
    assert splits.task.task_type == "multilabel"
    assert len(splits.task.label_names) == 14
    assert splits.train.labels.shape == (10, 14)
    assert splits.train.labels.dtype == np.float32
    _, y = splits.train[0]
    assert y.shape == (14,)


def test_size_64_and_env_var_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake(tmp_path, "bloodmnist", size=64, n_channels=3, n_classes=8, n=8)
    monkeypatch.setenv(MEDMNIST_DIR_ENV, str(tmp_path))
    splits = load_medmnist("BloodMNIST", None, size=64)
    assert splits.train.images.shape == (8, 64, 64, 3)
    assert resolve_medmnist_root(None) == tmp_path
    # An explicit root wins over the environment variable.
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_medmnist_root(str(other)) == other


# --------------------------------------------------------------------------- fake files, bad


def test_no_root_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MEDMNIST_DIR_ENV, raising=False)
    with pytest.raises(DataError, match=f"data.root.*{MEDMNIST_DIR_ENV}"):
        load_medmnist("pneumoniamnist", None)


def test_root_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_medmnist("pneumoniamnist", str(tmp_path / "nope"))


def test_unknown_flag_suggests_closest() -> None:
    with pytest.raises(DataError) as err:
        load_medmnist("pneumonimnist", "/tmp")
    msg = str(err.value)
    assert "Did you mean 'pneumoniamnist'" in msg and "retinamnist" in msg
    with pytest.raises(DataError, match="unknown MedMNIST dataset"):
        load_medmnist("organmnist3d", "/tmp")  # 3D volumes are not supported


def test_unsupported_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"sizes \[28, 64, 128, 224\], got 32"):
        load_medmnist("pneumoniamnist", str(tmp_path), size=32)


def test_missing_file_names_path_and_remedies(tmp_path: Path) -> None:
    write_fake(tmp_path, "pneumoniamnist")  # 28 px present, 128 px asked for
    with pytest.raises(DataError) as err:
        load_medmnist("pneumoniamnist", str(tmp_path), size=128)
    msg = str(err.value)
    assert str(tmp_path / "pneumoniamnist_128.npz") in msg
    assert MEDMNIST_DIR_ENV in msg and "data.root" in msg and "download" in msg


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(DataError, match="pneumoniamnist.npz.*cannot be read"):
        load_medmnist("pneumoniamnist", str(tmp_path))

    buf = io.BytesIO()
    np.savez_compressed(buf, train_images=np.zeros((50, 28, 28), np.uint8))
    (tmp_path / "pneumoniamnist.npz").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match="pneumoniamnist.npz"):
        load_medmnist("pneumoniamnist", str(tmp_path))


def test_single_npy_array_instead_of_npz(tmp_path: Path) -> None:
    with open(tmp_path / "pneumoniamnist.npz", "wb") as fh:
        np.save(fh, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="single .npy array"):
        load_medmnist("pneumoniamnist", str(tmp_path))


def test_missing_keys_lists_expected_and_found(tmp_path: Path) -> None:
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((2, 28, 28), np.uint8),
             train_labels=np.zeros((2, 1), np.uint8), x=np.zeros(1))
    with pytest.raises(DataError) as err:
        load_medmnist("pneumoniamnist", str(tmp_path))
    msg = str(err.value)
    assert "missing keys ['val_images', 'val_labels', 'test_images', 'test_labels']" in msg
    assert "found ['train_images', 'train_labels', 'x']" in msg


def test_label_out_of_range(tmp_path: Path) -> None:
    write_fake(tmp_path, "pneumoniamnist", n_classes=3)  # labels 0..2 but the task is binary
    with pytest.raises(DataError, match=r"pneumoniamnist.npz \[train_labels\].*0\.\.2.*2 classes"):
        load_medmnist("pneumoniamnist", str(tmp_path))


def test_wrong_image_shapes(tmp_path: Path) -> None:
    write_fake(tmp_path, "pneumoniamnist", n_channels=3)  # colour images for a grey dataset
    with pytest.raises(DataError, match=r"train_images has shape \(12, 28, 28, 3\), expected \(N, 28, 28\)"):
        load_medmnist("pneumoniamnist", str(tmp_path))
    # A 64 px file saved under the 28 px name.
    write_fake(tmp_path, "dermamnist", n_channels=3, n_classes=7, size=64, filename="dermamnist.npz")
    with pytest.raises(DataError, match=r"dermamnist.npz.*expected \(N, 28, 28, 3\).*data.size"):
        load_medmnist("dermamnist", str(tmp_path))


def test_wrong_dtypes_and_lengths(tmp_path: Path) -> None:
    write_fake(tmp_path, "octmnist", n_classes=4, val_images=np.zeros((12, 28, 28), np.float32))
    with pytest.raises(DataError, match="val_images has dtype float32"):
        load_medmnist("octmnist", str(tmp_path))
    write_fake(tmp_path, "octmnist", n_classes=4, test_labels=np.zeros((5, 1), np.uint8))
    with pytest.raises(DataError, match="12 images but test_labels has 5"):
        load_medmnist("octmnist", str(tmp_path))


def test_load_splits_medmnist_source(tmp_path: Path) -> None:
    write_fake(tmp_path, "pneumoniamnist", n=20)
    cfg = DataConfig(source="medmnist", flag="pneumoniamnist", root=str(tmp_path), max_train=8, seed=0)
    splits = load_splits(cfg)
    assert splits.source == "medmnist:pneumoniamnist"
    assert len(splits.train) == 8 and splits.train.class_counts().tolist() == [4, 4]
    assert len(splits.val) == 20
