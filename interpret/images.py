"""The images a report explains: a MedMNIST-style ``.npz`` or a folder of PNG/JPEG files.

They are brought to exactly what the model saw in training: the run's size and channels, uint8
scaled to [-1, 1] (:class:`splitfl.data.base.ArrayDataset`). Labels come with them where the source
has them (MedMNIST ``<split>_labels``, an ``.npz``'s ``labels``, or a folder's ``manifest.csv`` with
``path,label``) and are shown as the true label; without labels the report says "unknown".
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from splitfl.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageInputError(UserError, ValueError):
    """Images that cannot be explained by this model: says which file, what is wrong and what to do."""


@dataclass
class ReportImages:
    """Model-ready images with what the report shows about each."""

    x: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: Optional[np.ndarray]  # (N,) class ids, (N, K) multilabel rows, or None
    names: list[str]  # where each image came from ("test #12", "scan_003.png")
    source: str

    def __len__(self) -> int:
        return len(self.x)


def _to_model_input(arrays: np.ndarray, size: int, n_channels: int, where: str) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> (N, C, size, size) in [-1, 1], resized and converted as the run's data was."""
    if arrays.dtype != np.uint8:
        raise ImageInputError(f"{where}: images must be uint8 (0..255), got {arrays.dtype}")
    if arrays.ndim == 3:
        arrays = arrays[..., None]
    if arrays.ndim != 4 or arrays.shape[-1] not in (1, 3):
        raise ImageInputError(f"{where}: images must have shape (N, H, W) or (N, H, W, 1|3), got {arrays.shape}")
    mode = "L" if n_channels == 1 else "RGB"
    out = []
    for img in arrays:
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        pil = pil.convert(mode)
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.BILINEAR)
        a = np.asarray(pil, dtype=np.uint8)
        out.append(a[..., None] if a.ndim == 2 else a)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255.0)
    return x.sub(0.5).div(0.5)


def _npz(path: Path, split: str) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise ImageInputError(f"--images {path}: not a readable .npz file ({exc})") from None
    keys = set(data.files)
    if f"{split}_images" in keys:  # a MedMNIST file
        labels = data[f"{split}_labels"] if f"{split}_labels" in keys else None
        return data[f"{split}_images"], labels, f"{split} #"
    if "images" in keys:
        return data["images"], data["labels"] if "labels" in keys else None, "#"
    raise ImageInputError(f"--images {path}: has arrays {sorted(keys)}; expected MedMNIST's '{split}_images' "
                          "(with --split train/val/test) or 'images' (optionally 'labels')")


def _folder(folder: Path, label_names: tuple[str, ...]) -> tuple[list[np.ndarray], Optional[np.ndarray], list[str]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    labels_by_name: dict[str, int] = {}
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                if "path" not in row or "label" not in row:
                    raise ImageInputError(f"{manifest}: needs columns path,label")
                value = row["label"].strip()
                if value.isdigit() and int(value) < len(label_names):
                    labels_by_name[Path(row["path"]).name] = int(value)
                elif value in label_names:
                    labels_by_name[Path(row["path"]).name] = label_names.index(value)
                else:
                    raise ImageInputError(f"{manifest}, line {line}: label {value!r} is neither a class index nor one "
                                          f"of {list(label_names)}")
    if not files:
        raise ImageInputError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageInputError(f"--images {f}: cannot be read as an image ({exc})") from None
    labels = None
    if labels_by_name:
        missing = [f.name for f in files if f.name not in labels_by_name]
        if missing:
            raise ImageInputError(f"{manifest}: no label for {missing[:5]}; list every image or remove the manifest")
        labels = np.array([labels_by_name[f.name] for f in files])
    return arrays, labels, [f.name for f in files]


def load_report_images(path: str | Path, size: int, n_channels: int, label_names: tuple[str, ...],
                       split: str = "test", limit: Optional[int] = None, start: int = 0) -> ReportImages:
    """Images ``start .. start+limit`` of ``path``, ready for the run's model."""
    path = Path(path)
    if path.is_dir():
        arrays, labels, names = _folder(path, label_names)
        x = torch.cat([_to_model_input(a[None], size, n_channels, str(path / n)) for a, n in zip(arrays, names)])
    elif path.is_file() and path.suffix == ".npz":
        images, labels, prefix = _npz(path, split)
        names = [f"{prefix}{i}" for i in range(len(images))]
        stop = len(images) if limit is None else min(len(images), start + limit)
        if start >= len(images):
            raise ImageInputError(f"--images {path}: --start {start} is past its {len(images)} images")
        images, names = images[start:stop], names[start:stop]
        labels = None if labels is None else labels[start:stop]
        x = _to_model_input(images, size, n_channels, str(path))
    else:
        raise ImageInputError(f"--images {path}: give a .npz file (MedMNIST or images/labels arrays) or a folder of "
                              "PNG/JPEG files (optionally with manifest.csv: path,label)")
    if path.is_dir() and limit is not None:
        x, names = x[start:start + limit], names[start:start + limit]
        labels = None if labels is None else labels[start:start + limit]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:  # MedMNIST keeps single labels as (N, 1)
            labels = labels[:, 0]
    return ReportImages(x, labels, names, str(path))
