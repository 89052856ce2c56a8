"""Dividing image indices among simulated hospitals, and stratified subsets.

Federated results depend heavily on how data is spread over sites, so the
partition schemes are explicit, seeded and checked: every training image goes
to exactly one site, and each site gets at least ``min_site_size`` images.
The same stratified index helpers serve ``max_train`` subsets and the
train/val/test split of image folders, so class balance is kept everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splitfl.config import PartitionConfig
from splitfl.data.base import ArrayDataset, DataError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "quantity", "dirichlet_quantity", "natural")
_MAX_DIRICHLET_TRIES = 200


# --------------------------------------------------------------------------- stratified helpers


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to weights that add up exactly to total."""
    weights = np.asarray(weights, dtype=np.float64)
    raw = weights / weights.sum() * total
    counts = np.floor(raw).astype(np.int64)
    short = total - counts.sum()
    if short > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of size n with class proportions kept."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    if n < 1:
        raise DataError(f"max_train must be a positive number of images, got {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = _largest_remainder(counts, n)
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _stratified_counts(class_sizes: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """(classes, parts) counts: each class split by the fractions, part totals rounded globally.

    Rounding each class on its own would always hand spare images to the
    same part; here the spare images go where the part totals fall short.
    """
    totals = _largest_remainder(fractions, int(class_sizes.sum()))
    raw = class_sizes[:, None] * fractions[None, :]
    counts = np.floor(raw).astype(np.int64)
    deficit = totals - counts.sum(axis=0)
    for c in range(len(class_sizes)):
        for _ in range(int(class_sizes[c] - counts[c].sum())):
            k = int(np.lexsort((-(raw[c] - counts[c]), -deficit))[0])
            counts[c, k] += 1
            deficit[k] -= 1
    return counts


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Split indices into parts with the given fractions, class by class (seeded).

    Every part keeps the class mix, and part sizes match the fractions of
    the whole as closely as rounding allows.
    """
    labels = np.asarray(labels)
    fractions = np.asarray(fractions, dtype=np.float64)
    if (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise DataError(f"split fractions must be >= 0 and add up to 1, got {fractions.tolist()}")
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    counts = _stratified_counts(sizes, fractions)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c, row in zip(classes, counts):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for part, chunk in zip(parts, np.split(idx, np.cumsum(row)[:-1])):
            part.append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


# --------------------------------------------------------------------------- site partitions


def _iid(n: int, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_sites))


def _dirichlet(
    labels: np.ndarray, num_sites: int, alpha: float, min_site_size: int, rng: np.random.Generator,
    quantity_alpha: float | None = None,
) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): each class is spread over sites by Dir(alpha) shares.

    With ``quantity_alpha``, label *and* quantity skew: every draw also gives the
    sites size weights q ~ Dir(quantity_alpha), and class c goes to site k in
    proportion to q_k x its Dir(alpha) share, so big and small hospitals differ
    in their grade mix too.
    """
    classes = np.unique(labels)
    for _ in range(_MAX_DIRICHLET_TRIES):
        sites: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        sizes = rng.dirichlet(np.full(num_sites, quantity_alpha)) if quantity_alpha is not None else None
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            if sizes is not None:
                shares = shares * sizes / np.sum(shares * sizes)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for site, chunk in zip(sites, np.split(idx, cuts)):
                site.append(chunk)
        parts = [np.concatenate(s) for s in sites]
        if all(len(p) >= min_site_size for p in parts):
            return parts
    raise DataError(
        f"partition: dirichlet split with alpha={alpha}"
        f"{f' and quantity_alpha={quantity_alpha}' if quantity_alpha is not None else ''} could not give all {num_sites} sites at least "
        f"{min_site_size} images in {_MAX_DIRICHLET_TRIES} draws ({len(labels)} images); "
        "raise partition.alpha (or quantity_alpha), lower partition.num_sites or partition.min_site_size, or use more data"
    )


def _quantity(n: int, num_sites: int, alpha: float, min_site_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew: site sizes follow Dir(alpha) above a floor of min_site_size; labels iid."""
    spare = n - num_sites * min_site_size
    sizes = min_site_size + _largest_remainder(rng.dirichlet(np.full(num_sites, alpha)), spare)
    return list(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def _natural(dataset: ArrayDataset, num_sites: int) -> list[np.ndarray]:
    """One part per site id recorded with the images (e.g. a manifest's site column)."""
    if dataset.sites is None:
        raise DataError(
            "partition.scheme 'natural' needs a site id per image, but this dataset has none; "
            "add a 'site' column to the folder manifest or use scheme iid/dirichlet/quantity"
        )
    ids = np.unique(dataset.sites)
    if len(ids) != num_sites:
        raise DataError(
            f"partition.num_sites is {num_sites} but the data has {len(ids)} natural sites "
            f"{[str(i) for i in ids]}; set partition.num_sites: {len(ids)}"
        )
    return [np.flatnonzero(dataset.sites == i) for i in ids]


def partition_indices(
    dataset: ArrayDataset,
    scheme: str,
    num_sites: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_site_size: int = 10,
    quantity_alpha: float = 1.0,
) -> list[np.ndarray]:
    """Indices of the images each site holds (sorted; disjoint; together all images)."""
    if scheme not in SCHEMES:
        raise DataError(f"partition.scheme: unknown scheme {scheme!r}; choose one of {list(SCHEMES)}")
    if int(num_sites) != num_sites or num_sites < 1:
        raise DataError(f"partition.num_sites must be a positive whole number, got {num_sites!r}")
    if scheme in ("dirichlet", "quantity", "dirichlet_quantity") and not alpha > 0:
        raise DataError(f"partition.alpha must be > 0 for scheme {scheme!r}, got {alpha!r}")
    if scheme == "dirichlet_quantity" and not quantity_alpha > 0:
        raise DataError(f"partition.quantity_alpha must be > 0 for scheme {scheme!r}, got {quantity_alpha!r}")
    if min_site_size < 0:
        raise DataError(f"partition.min_site_size must be >= 0, got {min_site_size}")
    n = len(dataset)
    if scheme != "natural" and n < num_sites * min_site_size:
        raise DataError(
            f"partition: {n} images cannot give {num_sites} sites at least {min_site_size} each; "
            "lower partition.num_sites or partition.min_site_size, or use more training data"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(n, num_sites, rng)
    elif scheme in ("dirichlet", "dirichlet_quantity"):
        sizes_alpha = quantity_alpha if scheme == "dirichlet_quantity" else None
        parts = _dirichlet(dataset.single_labels(), num_sites, alpha, min_site_size, rng, sizes_alpha)
    elif scheme == "quantity":
        parts = _quantity(n, num_sites, alpha, min_site_size, rng)
    else:
        parts = _natural(dataset, num_sites)
        small = {str(dataset.sites[p[0]]): len(p) for p in parts if len(p) < min_site_size}
        if small:
            raise DataError(
                f"partition: natural sites {small} have fewer than partition.min_site_size="
                f"{min_site_size} images; lower min_site_size or merge those sites in the manifest"
            )
    return [np.sort(p).astype(np.int64) for p in parts]


def partition_dataset(dataset: ArrayDataset, cfg: PartitionConfig) -> list[ArrayDataset]:
    """The per-site datasets for a partition config."""
    parts = partition_indices(dataset, cfg.scheme, cfg.num_sites, cfg.alpha, cfg.seed, cfg.min_site_size,
                              cfg.quantity_alpha)
    return [dataset.subset(p) for p in parts]


def _short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def summary_table(
    dataset: ArrayDataset,
    parts: Sequence[np.ndarray | ArrayDataset],
    site_names: Sequence[str] | None = None,
) -> str:
    """Per-site class counts as aligned text: rows are sites, columns classes and total.

    For multilabel tasks the class columns count positive findings, so they
    can add up to more than the image total.
    """
    names = [_short(n) for n in dataset.task.label_names]
    rows: list[list[str]] = []
    totals = np.zeros(len(names), np.int64)
    n_total = 0
    for i, part in enumerate(parts):
        sub = part if isinstance(part, ArrayDataset) else dataset.subset(part)
        counts = sub.class_counts()
        totals += counts
        n_total += len(sub)
        label = site_names[i] if site_names is not None else f"site {i}"
        rows.append([str(label), *map(str, counts), str(len(sub))])
    rows.append(["all", *map(str, totals), str(n_total)])
    header = ["site", *names, "total"]
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])])
