"""The in-memory dataset and task description every data source produces.

All sources (synthetic, MedMNIST, image folders) are reduced to the same two
things: a :class:`TaskInfo` that says what is being predicted (so the loss,
metrics and label names can follow the task), and :class:`ArrayDataset` splits
of uint8 images with their labels. Small medical benchmarks fit in memory,
which keeps loading fast and deterministic on a 2-core machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from splitfl.errors import UserError

TaskType = Literal["binary", "multiclass", "ordinal", "multilabel"]
TASK_TYPES: tuple[str, ...] = ("binary", "multiclass", "ordinal", "multilabel")


class DataError(UserError, ValueError):
    """Bad or missing input data; the message says which file/key and what to do."""


@dataclass(frozen=True)
class TaskInfo:
    """What a dataset asks the model to predict.

    ``label_names`` has one entry per model output: per class for
    binary/multiclass/ordinal tasks (binary tasks use two logits and softmax,
    as the MedMNIST baselines do), per finding for multilabel tasks.
    """

    name: str
    task_type: TaskType
    label_names: tuple[str, ...]
    n_channels: int

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise DataError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if self.task_type == "binary" and len(self.label_names) != 2:
            raise DataError(f"binary task {self.name!r} needs exactly 2 label names, got {self.label_names}")
        if len(self.label_names) < 2:
            raise DataError(f"task {self.name!r} needs at least 2 labels, got {self.label_names}")

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    @property
    def multilabel(self) -> bool:
        return self.task_type == "multilabel"


def normalize_images(images: np.ndarray) -> np.ndarray:
    """Bring images to (N, H, W, C) uint8, the layout MedMNIST uses for colour."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"images must have shape (N,H,W) or (N,H,W,C); got {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 (0..255); got dtype {images.dtype}")
    return np.ascontiguousarray(images)


def validate_labels(labels: np.ndarray, task: TaskInfo, where: str) -> np.ndarray:
    """Check labels against the task and return them in canonical form.

    Single-label tasks: int64 of shape (N,). Multilabel: float32 of shape
    (N, num_outputs) with values in {0, 1}.
    """
    labels = np.asarray(labels)
    if task.multilabel:
        if labels.ndim != 2 or labels.shape[1] != task.num_outputs:
            raise DataError(
                f"{where}: multilabel task {task.name!r} expects labels of shape (N, {task.num_outputs}), "
                f"got {labels.shape}"
            )
        if not np.isin(labels, (0, 1)).all():
            raise DataError(f"{where}: multilabel labels must be 0/1")
        return labels.astype(np.float32)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{where}: expected one label per image (shape (N,) or (N,1)), got {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= task.num_outputs):
        raise DataError(
            f"{where}: labels range {labels.min()}..{labels.max()} but task {task.name!r} has "
            f"{task.num_outputs} classes {list(task.label_names)}; check the class count in the config"
        )
    return labels


class ArrayDataset(Dataset):
    """uint8 images + labels held in memory, served as normalised float tensors.

    Images are scaled to [-1, 1] (mean 0.5, std 0.5 per channel), matching the
    MedMNIST v2 baselines. ``sites`` optionally holds a natural site id per
    image (from a manifest column) for partitioning.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        task: TaskInfo,
        sites: Optional[np.ndarray] = None,
        where: str = "dataset",
    ) -> None:
        images = normalize_images(images)
        if images.shape[-1] != task.n_channels:
            raise DataError(
                f"{where}: images have {images.shape[-1]} channel(s) but task {task.name!r} expects {task.n_channels}"
            )
        labels = validate_labels(labels, task, where)
        if len(labels) != len(images):
            raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
        if sites is not None and len(sites) != len(images):
            raise DataError(f"{where}: {len(images)} images but {len(sites)} site ids")
        self.images = images
        self.labels = labels
        self.task = task
        self.sites = None if sites is None else np.asarray(sites)
        # Pre-normalised tensor view: cheap for small images, avoids per-item work.
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        self._x = x.sub_(0.5).div_(0.5)
        self._y = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._x[index], self._y[index]

    def subset(self, indices: np.ndarray) -> "ArrayDataset":
        """A new dataset with the given rows (used for site partitions)."""
        indices = np.asarray(indices, dtype=np.int64)
        sites = None if self.sites is None else self.sites[indices]
        return ArrayDataset(self.images[indices], self.labels[indices], self.task, sites)

    def class_counts(self) -> np.ndarray:
        """Per-class counts (per-finding positives for multilabel tasks)."""
        if self.task.multilabel:
            return self.labels.sum(axis=0).astype(np.int64)
        return np.bincount(self.labels, minlength=self.task.num_outputs)

    def single_labels(self) -> np.ndarray:
        """One integer label per image, for stratification and label skew.

        Multilabel images map to their first positive finding, or to an extra
        index ``num_outputs`` when they have none ("no finding").
        """
        if not self.task.multilabel:
            return self.labels
        has = self.labels.any(axis=1)
        first = self.labels.argmax(axis=1)
        return np.where(has, first, self.task.num_outputs).astype(np.int64)


@dataclass
class DataSplits:
    """Train/val/test splits of one task (the official splits where they exist)."""

    task: TaskInfo
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    source: str = ""
    meta: dict = field(default_factory=dict)
