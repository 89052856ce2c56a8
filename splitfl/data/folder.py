"""A hospital's own images, listed in a CSV manifest.

Hospitals rarely have data in a benchmark format, but they can always list
files: ``path,label`` plus optional ``site`` (for natural federated
partitions) and ``split`` (train/val/test, when splits are fixed already).
Paths are relative to the CSV's folder so a data folder can be moved as a
whole. Every problem is reported with the manifest row so it can be fixed in
a spreadsheet.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from splitfl.data.base import TASK_TYPES, ArrayDataset, DataError, DataSplits, TaskInfo
from splitfl.data.partition import stratified_split

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label")
SPLIT_VALUES: tuple[str, ...] = ("train", "val", "test")
_MODES = {1: "L", 3: "RGB"}


def _read_manifest(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows (whitespace-stripped); row i is line i + 2 of the file."""
    if not manifest.is_file():
        raise DataError(f"data.manifest: file not found: {manifest}; give the path of a CSV with columns path,label")
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{manifest}: cannot be read as a UTF-8 CSV file: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{manifest}: missing column(s) {missing}; the header must contain {list(REQUIRED_COLUMNS)} "
            f"(optional: site, split), found {header}"
        )
    if not rows:
        raise DataError(f"{manifest}: has a header but no image rows")
    return header, rows


def _tokens(value: str, multilabel: bool) -> list[str]:
    if not multilabel:
        return [value]
    return [t.strip() for t in value.split("|") if t.strip()]


def _name_sort_key(name: str) -> tuple[int, float | str]:
    """Numeric names in numeric order ("2" < "10"), then the rest alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def _label_index(value: str, names: Sequence[str], line: int, manifest: Path) -> int:
    """Class index for a name, or for an integer index into the names."""
    if value in names:
        return list(names).index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(names):
        return int(value)
    raise DataError(
        f"{manifest}, line {line}: unknown label {value!r}; known labels are {list(names)} "
        f"(or indices 0..{len(names) - 1}); fix the row or data.label_names"
    )


def _load_image(path: Path, n_channels: int, size: int, line: int, manifest: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{manifest}, line {line}: image not found: {path}")
    try:
        with Image.open(path) as img:
            img = img.convert(_MODES[n_channels])
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{manifest}, line {line}: cannot read image {path} (not a valid PNG/JPEG?): {exc}") from None
    return arr if n_channels == 3 else arr[..., None]


def load_folder(
    manifest: str | os.PathLike,
    task_type: str | None = None,
    label_names: Sequence[str] | None = None,
    n_channels: int = 3,
    size: int = 28,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> DataSplits:
    """Images and labels listed in a CSV manifest, split by its split column or by fractions."""
    manifest = Path(manifest).expanduser()
    if n_channels not in _MODES:
        raise DataError(f"data.n_channels must be 1 (grey) or 3 (RGB), got {n_channels!r}")
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"data.task_type must be one of {list(TASK_TYPES)} or null, got {task_type!r}")
    if int(size) != size or size < 8:
        raise DataError(f"data.size must be a whole number of pixels >= 8, got {size!r}")
    header, rows = _read_manifest(manifest)
    multilabel = task_type == "multilabel"
    lines = range(2, len(rows) + 2)

    for line, row in zip(lines, rows):
        if not row.get("path"):
            raise DataError(f"{manifest}, line {line}: empty 'path'")
        if not multilabel and not row.get("label"):
            raise DataError(f"{manifest}, line {line}: empty 'label' (only multilabel tasks allow no label)")
    if label_names is None:
        found = {t for row in rows for t in _tokens(row["label"], multilabel)}
        label_names = sorted(found, key=_name_sort_key)
    names = tuple(str(n) for n in label_names)
    if len(names) < 2:
        raise DataError(
            f"{manifest}: labels give only {len(names)} class(es) {list(names)}; a task needs at least 2, "
            "so add images of the other classes or list every class in data.label_names"
        )
    if task_type is None:
        task_type = "binary" if len(names) == 2 else "multiclass"
    task = TaskInfo(f"folder:{manifest.stem}", task_type, names, n_channels)

    if multilabel:
        labels = np.zeros((len(rows), len(names)), np.float32)
        for i, (line, row) in enumerate(zip(lines, rows)):
            for tok in _tokens(row["label"], True):
                labels[i, _label_index(tok, names, line, manifest)] = 1.0
    else:
        labels = np.array([_label_index(r["label"], names, ln, manifest) for ln, r in zip(lines, rows)], np.int64)

    base = manifest.parent
    images = np.stack([
        _load_image(base / row["path"], n_channels, int(size), line, manifest) for line, row in zip(lines, rows)
    ])
    sites = None
    if "site" in header:
        empty = [line for line, row in zip(lines, rows) if not row.get("site")]
        if empty:
            raise DataError(f"{manifest}: empty 'site' on line(s) {empty[:10]}; fill it in or drop the column")
        sites = np.array([row["site"] for row in rows])

    full = ArrayDataset(images, labels, task, sites, where=str(manifest))
    parts = _split_indices(full, header, rows, lines, manifest, val_fraction, test_fraction, seed)
    train, val, test = (full.subset(p) for p in parts)
    return DataSplits(
        task, train, val, test, source=f"folder:{manifest}",
        meta={"manifest": str(manifest), "n_images": len(full), "split_column": "split" in header},
    )


def _split_indices(
    full: ArrayDataset, header: list[str], rows: list[dict[str, str]], lines: range, manifest: Path,
    val_fraction: float, test_fraction: float, seed: int,
) -> list[np.ndarray]:
    """Train/val/test rows: from the manifest's split column, else a seeded stratified split."""
    if "split" in header:
        values = [row.get("split", "").lower() for row in rows]
        bad = [(ln, v) for ln, v in zip(lines, values) if v not in SPLIT_VALUES]
        if bad:
            raise DataError(
                f"{manifest}: 'split' must be one of {list(SPLIT_VALUES)}; bad values (line, value): {bad[:10]}"
            )
        parts = [np.flatnonzero(np.array(values) == s) for s in SPLIT_VALUES]
        source = "the manifest's split column"
    else:
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise DataError(
                f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be >= 0 "
                "and add up to less than 1"
            )
        fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        parts = stratified_split(full.single_labels(), fractions, seed)
        source = "data.val_fraction/test_fraction"
    empty = [s for s, p in zip(SPLIT_VALUES, parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"{manifest}: no images for split(s) {empty} (from {source}); each of train/val/test needs "
            "at least one image: add rows or change the fractions"
        )
    return parts
