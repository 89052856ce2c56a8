"""Plaintext aggregation of site updates, and the checks that keep garbage out of it.

The server validates every update before it touches the global model: a site
that sends NaNs, the wrong shape or a wildly scaled update is rejected with a
logged reason and the round continues with the others. The robust rules
(coordinate-wise median and trimmed mean, Yin et al. 2018) bound the influence
of a bad update that passes those checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGGREGATORS = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True)
class Rejection:
    """One update the server refused, and why (written to metrics.json and the log)."""

    round: int
    site: int
    reason: str


def check_update(update: object, size: int) -> str | None:
    """Why a single update is unusable, or None: wrong type, shape or non-finite values."""
    if not isinstance(update, np.ndarray):
        return f"update is a {type(update).__name__}, not an array"
    if update.shape != (size,):
        return f"update has shape {update.shape}, expected ({size},)"
    if not np.issubdtype(update.dtype, np.floating):
        return f"update has dtype {update.dtype}, expected floating point"
    bad = int(np.count_nonzero(~np.isfinite(update)))
    if bad:
        return f"update has {bad} non-finite values (NaN/inf)"
    return None


def norm_outliers(norms: dict[int, float], factor: float) -> dict[int, str]:
    """Sites whose update norm exceeds ``factor`` x the median norm of the round (needs 3+ updates).

    The median of three or more is not moved by one bad site, so a single
    wildly scaled update cannot hide itself by inflating the reference.
    """
    if factor <= 0 or len(norms) < 3:
        return {}
    median = float(np.median(list(norms.values())))
    limit = factor * max(median, 1e-12)
    return {
        site: f"update L2 norm {n:.3g} exceeds {factor:g} x the round's median norm {median:.3g}"
        for site, n in norms.items()
        if n > limit
    }


def aggregate(updates: list[np.ndarray], weights: list[float], rule: str = "mean", trim_ratio: float = 0.1) -> np.ndarray:
    """Combine updates: weighted mean, or unweighted coordinate-wise median / trimmed mean."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if rule not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {rule!r}; choose one of {AGGREGATORS}")
    if rule == "mean":
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(updates),) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights {weights} must be non-negative with a positive sum, one per update")
        out = np.zeros_like(updates[0], dtype=np.float64)
        for u, wi in zip(updates, w / w.sum()):
            out += wi * u
        return out.astype(np.float32)
    stacked = np.stack(updates)
    if rule == "median":
        return np.median(stacked, axis=0).astype(np.float32)
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"fed.trim_ratio {trim_ratio} must be in [0, 0.5)")
    cut = int(np.floor(trim_ratio * len(updates)))
    ordered = np.sort(stacked, axis=0)
    return ordered[cut : len(updates) - cut].mean(axis=0).astype(np.float32)
