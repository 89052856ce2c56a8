"""Unlabelled images for pretraining, from MedMNIST files, image folders and splitfl's synthetic generator.

Only images are ever read: a MedMNIST archive's ``*_labels`` members are never
opened, a manifest's ``label`` column is never looked at, and the synthetic
generator's labels are dropped. Every image is brought to one size and channel
count with the same PIL conversions splitfl's folder loader uses (bilinear
resize; ``L``/``RGB`` conversion, so grey is repeated to 3 channels and RGB
becomes grey by ITU-R 601 luma), then normalised to [-1, 1] like splitfl's
training data (:class:`~splitfl.data.base.ArrayDataset`).
"""
from __future__ import annotations

import csv
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from splitfl.data.base import DataError
from splitfl.data.folder import SPLIT_VALUES
from splitfl.data.medmnist_files import check_md5, medmnist_filename, medmnist_task, resolve_medmnist_root
from splitfl.data.synthetic import make_synthetic
from splitfl.pretrain.config import PretrainConfig, PretrainError, SourceConfig, describe_source, source_splits

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
_MODES = {1: "L", 3: "RGB"}
_MIN_SYNTHETIC_SIZE = 16  # splitfl's generator draws nothing smaller


class UnlabeledImages(Dataset):
    """uint8 images (N, H, W, C) held in memory, served as normalised float tensors, and nothing else."""

    def __init__(self, images: np.ndarray) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(f"images must be uint8 of shape (N, H, W, C), got {images.dtype} {images.shape}")
        self.images = images
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        self._x = x.sub_(0.5).div_(0.5)  # [-1, 1], as ArrayDataset: mean 0.5, std 0.5 per channel

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._x[index]


@dataclass
class LoadedSource:
    """One source's images (already at the pretraining size and channels) and what pretrain.json says about it."""

    description: str
    images: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def conform(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, H, W[, C]) images at ``size`` x ``size`` with ``channels`` channels, via PIL as the folder loader."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == channels and images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    out = np.empty((len(images), size, size, channels), np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = _to_array(pil, size, channels)
    return out


def _to_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    img = img.convert(_MODES[channels])
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr if channels == 3 else arr[..., None]


def _read_image(path: Path, size: int, channels: int, where: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as img:
            return _to_array(img, size, channels)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read image {path} (not a valid PNG/JPEG?): {exc}") from None


def _subset(images: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """A seeded random subset (no labels to stratify by), in the original order."""
    if max_images is None or max_images >= len(images):
        return images
    keep = np.sort(np.random.default_rng([int(seed), 7]).choice(len(images), int(max_images), replace=False))
    return images[keep]


# ----------------------------------------------------------------------------- MedMNIST


def _read_split_images(path: Path, split: str, n_channels: int, file_size: int, where: str) -> np.ndarray:
    """``{split}_images`` of a MedMNIST archive; the archive's other members (the labels) are not opened."""
    redownload = "delete it and download it again (splitfl.data.download_medmnist on a machine with internet)"
    key = f"{split}_images"
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{where}: {path} cannot be read as a .npz archive (corrupt or truncated?): {exc}; {redownload}") from None
    if not hasattr(npz, "files"):
        raise DataError(f"{where}: {path} holds a single array, not a MedMNIST .npz archive; {redownload}")
    with npz:
        if key not in npz.files:
            raise DataError(f"{where}: {path} has no key {key!r} (found {sorted(npz.files)}); {redownload}")
        try:
            images = npz[key]  # reads this member only: np.load on an archive is lazy
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise DataError(f"{where}: {path} member {key} is damaged: {exc}; {redownload}") from None
    expected = (file_size, file_size) if n_channels == 1 else (file_size, file_size, n_channels)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise DataError(
            f"{where}: {path} key {key} holds {images.dtype} {images.shape}, expected uint8 "
            f"(N, {', '.join(map(str, expected))}); check flag and size match this file"
        )
    return images


def _load_medmnist(src: SourceConfig, where: str, size: int, channels: int) -> LoadedSource:
    task = medmnist_task(src.flag or "")  # flag check against medmnist's metadata: channels, not labels
    file_size = int(src.size or 28)
    folder = resolve_medmnist_root(src.root)
    path = folder / medmnist_filename(task.name, file_size)
    if not path.is_file():
        raise DataError(
            f"{where}: MedMNIST file not found: {path}. Put {path.name} in that folder or point root / "
            f"$SPLITFL_MEDMNIST_DIR at the folder that has it"
        )
    key = where.split(" ", 1)[0] + ".md5_check"  # check_md5 names the training key; say this source's instead
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            md5 = check_md5(path, task.name, file_size, src.md5_check)
    except DataError as exc:
        raise DataError(f"{where}: {str(exc).replace('data.md5_check', key)}") from None
    for w in caught:
        warnings.warn(f"{where}: {str(w.message).replace('data.md5_check', key)}", w.category, stacklevel=3)
    splits = source_splits(src) or ["train"]
    parts = [_read_split_images(path, s, task.n_channels, file_size, where) for s in splits]
    counts = {s: len(p) for s, p in zip(splits, parts)}
    images = _subset(np.concatenate(parts), src.max_images, src.seed)
    info = {"kind": "medmnist", "flag": task.name, "path": str(path), "splits": splits, "split_images": counts,
            "source_channels": task.n_channels, "source_size": file_size, **md5}
    return LoadedSource(where, conform(images, size, channels), info)


# ----------------------------------------------------------------------------- folders


def _manifest_rows(manifest: Path, splits: list[str] | None, where: str) -> tuple[list[Path], list[str] | None]:
    """Image paths of a manifest's rows in ``splits``; reads the ``path`` and ``split`` columns only."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [
                {k.strip(): (v or "").strip() for k, v in row.items() if k and k.strip() in ("path", "split")}
                for row in reader
            ]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{where}: {manifest} cannot be read as a UTF-8 CSV file: {exc}") from None
    if "path" not in header:
        raise DataError(f"{where}: {manifest} has no 'path' column (found {header}); list one image path per row")
    has_split = "split" in header
    if splits is not None and not has_split:
        raise DataError(
            f"{where}: splits {splits} given but {manifest} has no 'split' column; add one "
            f"({'/'.join(SPLIT_VALUES)} per row) or drop splits to use every image"
        )
    chosen = splits if splits is not None else (["train"] if has_split else None)
    paths = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path"):
            raise DataError(f"{where}: {manifest}, line {line}: empty 'path'")
        if has_split:
            value = row.get("split", "").lower()
            if value not in SPLIT_VALUES:
                raise DataError(f"{where}: {manifest}, line {line}: split must be one of {list(SPLIT_VALUES)}, got {value!r}")
            if value not in chosen:
                continue
        paths.append(manifest.parent / row["path"])
    if not paths:
        raise DataError(f"{where}: {manifest} lists no images{f' in splits {chosen}' if chosen else ''}")
    return paths, chosen


def _load_folder(src: SourceConfig, where: str, size: int, channels: int) -> LoadedSource:
    root = Path(src.path or "").expanduser()
    if root.is_dir():
        if src.splits is not None:
            raise PretrainError(
                f"{where}: a folder of images has no splits, but splits {src.splits} is set; drop it (every image "
                "is used), or list the images in a CSV manifest with a split column"
            )
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"{where}: no {'/'.join(IMAGE_SUFFIXES)} files under {root}")
        chosen = None
        info: dict[str, Any] = {"kind": "folder", "path": str(root), "splits": None}
    elif root.is_file():
        paths, chosen = _manifest_rows(root, src.splits, where)
        info = {"kind": "folder", "manifest": str(root), "splits": chosen}
    else:
        raise DataError(f"{where}: path {str(root)!r} is neither a folder of images nor a CSV manifest")
    if src.max_images is not None and src.max_images < len(paths):  # subset before decoding
        keep = np.sort(np.random.default_rng([int(src.seed), 7]).choice(len(paths), int(src.max_images), replace=False))
        paths = [paths[i] for i in keep]
    images = np.stack([_read_image(p, size, channels, where) for p in paths])
    return LoadedSource(where, images, info)


# ----------------------------------------------------------------------------- synthetic


def _load_synthetic(src: SourceConfig, where: str, size: int, channels: int) -> LoadedSource:
    render = int(src.size or max(size, _MIN_SYNTHETIC_SIZE))
    splits = source_splits(src) or ["train"]
    n = {s: (int(src.n) if s in splits else 1) for s in ("train", "val", "test")}  # test: one image, never used
    data = make_synthetic(src.modality, n["train"], n["val"], n["test"], render, src.seed)
    images = np.concatenate([getattr(data, s).images for s in splits])  # images only; the generator's labels are dropped
    images = _subset(images, src.max_images, src.seed)
    info = {"kind": "synthetic", "modality": src.modality, "seed": src.seed, "splits": splits, "render_size": render}
    return LoadedSource(where, conform(images, size, channels), info)


_LOADERS = {"medmnist": _load_medmnist, "folder": _load_folder, "synthetic": _load_synthetic}


def load_source(src: SourceConfig, index: int, size: int, channels: int) -> LoadedSource:
    """One source's images at ``size`` px with ``channels`` channels."""
    where = describe_source(src, index)
    if src.splits is not None and "test" in src.splits:  # also checked by validate(); kept here for direct callers
        raise PretrainError(f"{where}: the test split must not be used for pretraining; use train and/or val")
    loaded = _LOADERS[src.kind](src, where, size, channels)
    loaded.info = {"source": where, **loaded.info, "n_images": len(loaded.images)}
    return loaded


def load_images(cfg: PretrainConfig) -> tuple[UnlabeledImages, list[dict[str, Any]]]:
    """Every configured source, pooled into one dataset; also each source's description for pretrain.json."""
    loaded = [load_source(src, i, int(cfg.img_size), int(cfg.channels)) for i, src in enumerate(cfg.sources)]
    images = np.concatenate([s.images for s in loaded])
    return UnlabeledImages(images), [s.info for s in loaded]
