"""Data sources for splitfl: synthetic images, local MedMNIST files, image folders.

Every source returns :class:`DataSplits`; :func:`load_splits` picks the source
named in a :class:`~splitfl.config.DataConfig`, and the partition helpers then
divide the training split among simulated hospitals.
"""
from __future__ import annotations

from splitfl.config import DataConfig
from splitfl.data.base import ArrayDataset, DataError, DataSplits, TaskInfo, validate_labels
from splitfl.data.folder import load_folder
from splitfl.data.medmnist_files import (
    download_medmnist,
    load_medmnist,
    medmnist_task,
    resolve_medmnist_root,
    supported_flags,
)
from splitfl.data.partition import (
    partition_dataset,
    partition_indices,
    stratified_split,
    stratified_subset,
    summary_table,
)
from splitfl.data.synthetic import MODALITIES, make_synthetic

SOURCES: tuple[str, ...] = ("synthetic", "medmnist", "folder")

__all__ = [
    "ArrayDataset", "DataError", "DataSplits", "TaskInfo", "validate_labels",
    "MODALITIES", "SOURCES", "make_synthetic", "load_medmnist", "download_medmnist", "medmnist_task",
    "resolve_medmnist_root", "supported_flags", "load_folder", "partition_indices", "partition_dataset",
    "summary_table", "stratified_split", "stratified_subset", "load_splits", "cap_train",
]


def cap_train(splits: DataSplits, max_train: int | None, seed: int = 0) -> DataSplits:
    """Keep at most max_train training images (stratified, seeded); val/test untouched."""
    if max_train is None or max_train >= len(splits.train):
        return splits
    keep = stratified_subset(splits.train.single_labels(), int(max_train), seed)
    meta = {**splits.meta, "n_train_full": len(splits.train)}
    return DataSplits(splits.task, splits.train.subset(keep), splits.val, splits.test, splits.source, meta)


def load_splits(cfg: DataConfig) -> DataSplits:
    """The train/val/test splits described by a data config."""
    if cfg.max_train is not None and cfg.max_train < 1:
        raise DataError(f"data.max_train must be a positive number of images or null, got {cfg.max_train}")
    if cfg.source == "synthetic":
        n_train = cfg.n_train if cfg.max_train is None else min(cfg.n_train, cfg.max_train)
        return make_synthetic(cfg.modality, n_train, cfg.n_val, cfg.n_test, cfg.size, cfg.seed)
    if cfg.source == "medmnist":
        return load_medmnist(cfg.flag, cfg.root, cfg.size, cfg.max_train, cfg.seed, cfg.md5_check)
    if cfg.source == "folder":
        if not cfg.manifest:
            raise DataError("data.manifest: source 'folder' needs the path of a CSV manifest (columns path,label)")
        splits = load_folder(
            cfg.manifest, cfg.task_type, cfg.label_names, cfg.n_channels, cfg.size,
            cfg.val_fraction, cfg.test_fraction, cfg.seed,
        )
        return cap_train(splits, cfg.max_train, cfg.seed)
    raise DataError(f"data.source: unknown source {cfg.source!r}; choose one of {list(SOURCES)}")
