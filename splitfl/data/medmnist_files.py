"""MedMNIST v2/v3 ``.npz`` files from a local folder.

Training machines often have no internet, so loading never downloads: the
files are looked up in a folder given by the config (``data.root``) or the
``SPLITFL_MEDMNIST_DIR`` environment variable. The ``medmnist`` package
supplies the metadata (task, label names, channels, file naming, sizes) and
the real download, which :func:`download_medmnist` runs on a connected
machine. The arrays are read here rather than through medmnist's dataset
classes, because those raise bare RuntimeError/KeyError on bad files and
assert the official sample counts, while users need to be told which file
and key is wrong and what to do about it.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from splitfl.config import MEDMNIST_DIR_ENV
from splitfl.data.base import ArrayDataset, DataError, DataSplits, TaskInfo
from splitfl.data.partition import stratified_subset

# medmnist task strings -> our task types.
TASK_MAP: dict[str, str] = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "ordinal-regression": "ordinal",
    "multi-label, binary-class": "multilabel",
}
_SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
_KEYS: tuple[str, ...] = tuple(f"{s}_{k}" for s in _SPLIT_NAMES for k in ("images", "labels"))


def _medmnist():
    """Import medmnist lazily: it creates ~/.medmnist on import."""
    import medmnist  # lazy: importing medmnist creates ~/.medmnist, which a run that never reads it must not do

    return medmnist


def supported_flags() -> tuple[str, ...]:
    """The 2D MedMNIST datasets (3D volumes do not fit the 2D models here)."""
    mm = _medmnist()
    return tuple(
        flag for flag, info in mm.INFO.items()
        if issubclass(getattr(mm, info["python_class"]), mm.dataset.MedMNIST2D)
    )


def supported_sizes() -> tuple[int, ...]:
    """Image sizes published for the 2D datasets (28, 64, 128, 224)."""
    return tuple(_medmnist().dataset.MedMNIST2D.available_sizes)


def _check_flag(flag: str) -> str:
    flags = supported_flags()
    key = flag.lower().strip()
    if key not in flags:
        close = difflib.get_close_matches(key, flags, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"data.flag: unknown MedMNIST dataset {flag!r}.{hint} Valid flags: {', '.join(flags)}")
    return key


def _check_size(size: int) -> int:
    sizes = supported_sizes()
    if size not in sizes:
        raise DataError(f"data.size: MedMNIST images come in sizes {list(sizes)}, got {size!r}")
    return int(size)


def medmnist_task(flag: str) -> TaskInfo:
    """Our task description for a MedMNIST flag, from ``medmnist.INFO``."""
    flag = _check_flag(flag)
    info = _medmnist().INFO[flag]
    labels = tuple(info["label"][k] for k in sorted(info["label"], key=int))
    return TaskInfo(flag, TASK_MAP[info["task"]], labels, int(info["n_channels"]))


def medmnist_filename(flag: str, size: int = 28) -> str:
    """The file name medmnist uses: ``{flag}.npz`` at 28 px, ``{flag}_{size}.npz`` otherwise."""
    size = _check_size(size)
    return f"{_check_flag(flag)}.npz" if size == 28 else f"{_check_flag(flag)}_{size}.npz"


def resolve_medmnist_root(root: str | os.PathLike | None) -> Path:
    """The folder holding the ``.npz`` files: explicit argument, else $SPLITFL_MEDMNIST_DIR."""
    chosen = root if root not in (None, "") else os.environ.get(MEDMNIST_DIR_ENV) or None
    if chosen is None:
        raise DataError(
            f"no MedMNIST folder given: set data.root in the config or the environment variable "
            f"{MEDMNIST_DIR_ENV} to a folder holding the .npz files (e.g. pneumoniamnist.npz)"
        )
    path = Path(chosen).expanduser()
    if not path.is_dir():
        origin = "data.root" if root not in (None, "") else f"${MEDMNIST_DIR_ENV}"
        raise DataError(f"MedMNIST folder {str(path)!r} (from {origin}) does not exist or is not a folder")
    return path


def _read_npz(path: Path, flag: str, size: int) -> dict[str, np.ndarray]:
    """All six arrays of a MedMNIST file, with corrupt files and missing keys reported clearly."""
    redownload = (
        f"delete it and download it again (splitfl's download_medmnist('{flag}', root, {size}) on a "
        "machine with internet, or from the MedMNIST Zenodo record)"
    )
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: holds a single .npy array, not a MedMNIST .npz archive; {redownload}")
    if not magic.startswith(b"PK"):
        raise DataError(f"{path}: cannot be read, it is not a .npz (zip) archive (starts with {magic!r}); {redownload}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot be read as a .npz archive (corrupt or truncated?): {exc}; {redownload}"
        ) from None
    with npz:
        found = sorted(npz.files)
        missing = [k for k in _KEYS if k not in found]
        if missing:
            raise DataError(
                f"{path}: not a MedMNIST file, missing keys {missing}; expected {list(_KEYS)}, "
                f"found {found}; {redownload}"
            )
        try:
            return {k: npz[k] for k in _KEYS}
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise DataError(f"{path}: an array inside the archive is damaged: {exc}; {redownload}") from None


def _split_dataset(arrays: dict[str, np.ndarray], split: str, task: TaskInfo, size: int, path: Path) -> ArrayDataset:
    """Check one split's shapes and labels against the task, then wrap it."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    expected = (size, size) if task.n_channels == 1 else (size, size, task.n_channels)
    if images.ndim != 1 + len(expected) or images.shape[1:] != expected:
        raise DataError(
            f"{path}: key {split}_images has shape {images.shape}, expected (N, {', '.join(map(str, expected))}) "
            f"for {task.name} at {size} px; check data.flag and data.size match this file"
        )
    if images.dtype != np.uint8:
        raise DataError(f"{path}: key {split}_images has dtype {images.dtype}, expected uint8 (0..255)")
    if len(labels) != len(images):
        raise DataError(f"{path}: {split}_images has {len(images)} images but {split}_labels has {len(labels)} labels")
    if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
        raise DataError(f"{path}: key {split}_labels has dtype {labels.dtype}, expected integers")
    return ArrayDataset(images, labels, task, where=f"{path} [{split}_labels]")


def official_md5(flag: str, size: int = 28) -> str | None:
    """The MD5 that medmnist's own metadata lists for the file of this flag and size (None if it lists none)."""
    info = _medmnist().INFO[_check_flag(flag)]
    return info.get("MD5" if _check_size(size) == 28 else f"MD5_{size}")


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: Path, flag: str, size: int, mode: str = "warn") -> dict[str, object]:
    """Compare a file's MD5 with medmnist's metadata: ``strict`` refuses a mismatch, ``warn`` warns, ``off`` skips.

    A mismatch means the file is not the published one (damaged, another version, or re-ordered), so results
    on it are not comparable with the published baselines; the user decides whether that matters.
    """
    if mode == "off":
        return {"md5": None, "official_md5": None, "official": None}
    expected, actual = official_md5(flag, size), file_md5(path)
    record: dict[str, object] = {"md5": actual, "official_md5": expected, "official": expected == actual}
    if expected is not None and actual != expected:
        message = (
            f"{path}: MD5 {actual} differs from the one medmnist's metadata lists for {flag} at {size} px "
            f"({expected}): this is not the published file (damaged, another version or re-ordered), so results are "
            "not comparable with published baselines. Download it again with download_medmnist, or set "
            "data.md5_check: off if this copy is deliberate"
        )
        if mode == "strict":
            raise DataError(message)
        warnings.warn(message, stacklevel=3)
    return record


def load_medmnist(
    flag: str, root: str | os.PathLike | None, size: int = 28, max_train: int | None = None, seed: int = 0,
    md5_check: str = "warn",
) -> DataSplits:
    """Official train/val/test splits of a local MedMNIST file (max_train: stratified subset), MD5-checked."""
    task = medmnist_task(flag)
    size = _check_size(size)
    folder = resolve_medmnist_root(root)
    path = folder / medmnist_filename(task.name, size)
    if not path.is_file():
        raise DataError(
            f"MedMNIST file not found: {path}. Put {path.name} in that folder, point "
            f"{MEDMNIST_DIR_ENV} / data.root at the folder that has it, or run "
            f"download_medmnist('{task.name}', root, {size}) on a machine with internet and copy it here"
        )
    md5 = check_md5(path, task.name, size, md5_check)
    arrays = _read_npz(path, task.name, size)
    splits = {s: _split_dataset(arrays, s, task, size, path) for s in _SPLIT_NAMES}
    n_full = len(splits["train"])
    if max_train is not None:
        keep = stratified_subset(splits["train"].single_labels(), int(max_train), seed)
        splits["train"] = splits["train"].subset(keep)
    return DataSplits(
        task, splits["train"], splits["val"], splits["test"], source=f"medmnist:{task.name}",
        meta={"flag": task.name, "size": size, "path": str(path), "n_train_full": n_full, **md5},
    )


def download_medmnist(flag: str, root: str | os.PathLike | None, size: int = 28) -> Path:
    """Fetch a MedMNIST file with medmnist's own downloader (needs internet; MD5-checked)."""
    mm = _medmnist()
    task = medmnist_task(flag)
    size = _check_size(size)
    chosen = root if root not in (None, "") else os.environ.get(MEDMNIST_DIR_ENV)
    if not chosen:
        raise DataError(f"download_medmnist: give a target folder (root) or set {MEDMNIST_DIR_ENV}")
    folder = Path(chosen).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    cls = getattr(mm, mm.INFO[task.name]["python_class"])
    try:
        cls(split="train", root=str(folder), size=size, download=True)
    except Exception as exc:  # medmnist wraps network failures in RuntimeError with a manual how-to
        raise DataError(f"download of {task.name} ({size} px) into {folder} failed: {exc}") from exc
    return folder / medmnist_filename(task.name, size)
