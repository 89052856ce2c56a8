"""How much two sets of attribution maps agree, image by image.

Used to ask "does the split/federated model look where the centrally
trained one looks?". Two numbers per image:

* Spearman rank correlation of the flattened maps (average ranks for ties,
  so it equals ``scipy.stats.spearmanr``); undefined (NaN) when a map is
  constant, e.g. an all-zero Grad-CAM.
* Top-k overlap: the share of the top ``top_fraction`` pixels (default 10%)
  the two maps have in common, plus the Jaccard index of those two sets.

Judge agreement against a baseline, never against 1: two centrally trained
models that differ only in their seed already agree far from perfectly
(rank correlation around 0.5-0.65 for small CNNs). Report the seed-to-seed
figure (``compare_maps(maps_central_seed0, maps_central_seed1)``) beside the
regime-vs-central one. :func:`compare_maps` is symmetric in its arguments,
so the order of the two models does not matter.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from scipy.stats import rankdata

__all__ = ["compare_maps", "spearman_per_image", "top_fraction_overlap"]

MapsLike = Union[torch.Tensor, np.ndarray]


def _flat(maps: MapsLike, name: str) -> np.ndarray:
    arr = maps.detach().cpu().double().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"{name} must be maps (B, H, W) (or (B, N)), got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return arr.reshape(arr.shape[0], -1)


def _pair(maps_a: MapsLike, maps_b: MapsLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _flat(maps_a, "maps_a"), _flat(maps_b, "maps_b")
    if a.shape != b.shape:
        raise ValueError(
            f"maps_a and maps_b must have the same shape (same images, same size); got "
            f"{tuple(np.shape(maps_a))} and {tuple(np.shape(maps_b))}."
        )
    return a, b


def spearman_per_image(maps_a: MapsLike, maps_b: MapsLike) -> np.ndarray:
    """Spearman rank correlation per image, ``(B,)``; NaN where either map is constant."""
    a, b = _pair(maps_a, maps_b)
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(rho, -1.0, 1.0)


def _top_k(top_fraction: float, n: int) -> int:
    if not 0.0 < float(top_fraction) <= 1.0:
        raise ValueError(f"top_fraction={top_fraction} must be in (0, 1], e.g. 0.1 for the top 10% of pixels.")
    return max(1, int(round(top_fraction * n)))


def top_fraction_overlap(
    maps_a: MapsLike, maps_b: MapsLike, top_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """``(overlap, jaccard)`` per image of the two maps' top ``top_fraction`` pixels.

    overlap = |A and B| / k, jaccard = |A and B| / |A or B|, with A, B the k
    highest-valued pixels (ties broken by pixel index, identically for both).
    """
    a, b = _pair(maps_a, maps_b)
    k = _top_k(top_fraction, a.shape[1])
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    inter = np.array([np.intersect1d(ta, tb, assume_unique=True).size for ta, tb in zip(top_a, top_b)], dtype=float)
    return inter / k, inter / (2 * k - inter)


def compare_maps(
    maps_a: MapsLike, maps_b: MapsLike, top_fraction: float = 0.1, *, absolute: bool = False
) -> dict[str, Any]:
    """Per-image and mean agreement of two ``(B, H, W)`` map sets of the same images.

    Args:
        maps_a, maps_b: maps of the same images by two models (or methods).
        top_fraction: share of pixels counted as "top" for the overlap.
        absolute: compare ``|map|`` (importance regardless of sign), e.g.
            for signed Integrated Gradients maps where strong negative
            evidence also matters.

    Returns:
        ``spearman``, ``top_overlap``, ``top_jaccard``: ``(B,)`` arrays;
        ``mean_spearman`` (NaN images left out; ``n_undefined`` counts them),
        ``mean_top_overlap``, ``mean_top_jaccard``; ``top_fraction`` and ``k``
        (pixels in each top set).
    """
    a, b = _pair(maps_a, maps_b)
    if absolute:
        a, b = np.abs(a), np.abs(b)
    rho = spearman_per_image(a, b)
    overlap, jaccard = top_fraction_overlap(a, b, top_fraction)
    defined = ~np.isnan(rho)
    return {
        "spearman": rho,
        "top_overlap": overlap,
        "top_jaccard": jaccard,
        "mean_spearman": float(rho[defined].mean()) if defined.any() else float("nan"),
        "mean_top_overlap": float(overlap.mean()),
        "mean_top_jaccard": float(jaccard.mean()),
        "n_undefined": int((~defined).sum()),
        "top_fraction": float(top_fraction),
        "k": _top_k(top_fraction, a.shape[1]),
    }
