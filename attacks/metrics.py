"""Image-similarity metrics for reconstruction attacks, pinned to one implementation.

Attack papers report SSIM/PSNR with different windows, data ranges and
libraries, so numbers are not comparable across them. Everything in
``attacks`` goes through the two functions here, which call
``torchmetrics.functional.image`` with fixed settings:

* SSIM: Gaussian window of size 11, sigma 1.5, ``data_range=1.0``, k1=0.01,
  k2=0.03, one value per image (``reduction="none"``).
* PSNR: ``data_range=1.0``, mean squared error over (C, H, W) per image.
  A perfect copy has MSE 0 and infinite PSNR; we cap at ``PSNR_CAP_DB`` so
  results stay finite in JSON and in means (8-bit quantisation alone bounds
  meaningful PSNR at about 59 dB, so the cap never hides a real difference).

Both images are first mapped to [0, 1] by ``to_unit``: ``(x - lo) / (hi - lo)``
for the model's input range ``(lo, hi)`` (splitfl feeds models [-1, 1]), then
clamped to [0, 1], because unconstrained attacks (DLG) can overshoot the range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5
DATA_RANGE = 1.0
PSNR_CAP_DB = 100.0
# splitfl's datasets serve images normalised with mean 0.5, std 0.5.
DEFAULT_VALUE_RANGE: tuple[float, float] = (-1.0, 1.0)

ValueRange = tuple[float, float]


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """(C,H,W) -> (1,C,H,W); anything else but (N,C,H,W) is an error."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected images of shape (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    return x


def to_unit(x: torch.Tensor, value_range: ValueRange = DEFAULT_VALUE_RANGE) -> torch.Tensor:
    """Map images from the model's ``value_range`` to [0, 1] (linear, then clamped), as float32."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range!r}")
    return ((x.detach().float() - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _pair(preds: torch.Tensor, target: torch.Tensor, value_range: ValueRange) -> tuple[torch.Tensor, torch.Tensor]:
    preds, target = _as_batch(preds, "preds"), _as_batch(target, "target")
    if preds.shape != target.shape:
        raise ValueError(f"preds and target shapes differ: {tuple(preds.shape)} vs {tuple(target.shape)}")
    return to_unit(preds, value_range), to_unit(target.to(preds.device), value_range)


def ssim(preds: torch.Tensor, target: torch.Tensor, value_range: ValueRange = DEFAULT_VALUE_RANGE) -> torch.Tensor:
    """Per-image SSIM, shape (N,), with the pinned window/data range (see module docstring)."""
    p, t = _pair(preds, target, value_range)
    return structural_similarity_index_measure(
        p, t, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL_SIZE,
        reduction="none", data_range=DATA_RANGE,
    ).reshape(-1)


def psnr(preds: torch.Tensor, target: torch.Tensor, value_range: ValueRange = DEFAULT_VALUE_RANGE) -> torch.Tensor:
    """Per-image PSNR in dB, shape (N,), capped at ``PSNR_CAP_DB`` (identical images give the cap)."""
    p, t = _pair(preds, target, value_range)
    out = peak_signal_noise_ratio(p, t, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    return out.reshape(-1).clamp(max=PSNR_CAP_DB)


def _window_matrix(n: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, n + 2 pad) banded matrix of the SSIM Gaussian: ``M @ x`` is the valid 1-D convolution of a padded x."""
    size = 2 * pad + 1
    dist = torch.arange(start=(1 - size) / 2, end=(1 + size) / 2, step=1, dtype=dtype)
    g = torch.exp(-torch.pow(dist / SSIM_SIGMA, 2) / 2)
    g = g / g.sum()
    m = torch.zeros((n, n + 2 * pad), dtype=dtype)
    for i in range(n):
        m[i, i:i + size] = g
    return m


def pairwise_ssim(
    a: torch.Tensor, b: torch.Tensor, value_range: ValueRange = DEFAULT_VALUE_RANGE, chunk: int = 4096
) -> torch.Tensor:
    """SSIM of every image in ``a`` against every image in ``b``: (len(a), len(b)).

    Used for matching and for nearest-neighbour re-identification. The same
    SSIM as :func:`ssim` (torchmetrics' reflect padding, Gaussian window,
    constants; equal up to float32 rounding, < 1e-4 on real images, tested),
    computed ~10x faster for many pairs: the
    window is separable, so each image's local means and second moments are
    two small matrix products computed once, and each pair needs only the
    windowed mean of its product (in chunks of ``chunk`` pairs).
    """
    a, b = _as_batch(a, "a"), _as_batch(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    out = torch.empty((len(a), len(b)))
    if len(a) == 0 or len(b) == 0:
        return out
    # torchmetrics' Gaussian window: int(3.5 sigma + 0.5) * 2 + 1 taps, reflect padding of half of it
    pad = int(3.5 * SSIM_SIGMA + 0.5)
    h, w = a.shape[-2:]
    pa = F.pad(to_unit(a, value_range), (pad, pad, pad, pad), mode="reflect")
    pb = F.pad(to_unit(b, value_range), (pad, pad, pad, pad), mode="reflect")
    mh, mw = _window_matrix(h, pad, pa.dtype), _window_matrix(w, pad, pa.dtype)

    def window(x: torch.Tensor) -> torch.Tensor:  # (..., H + 2 pad, W + 2 pad) -> (..., H, W)
        return mh @ x @ mw.T

    mu_a, mu_b = window(pa), window(pb)
    sq_a, sq_b = window(pa * pa), window(pb * pb)
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    ia, ib = torch.meshgrid(torch.arange(len(a)), torch.arange(len(b)), indexing="ij")
    ia, ib = ia.reshape(-1), ib.reshape(-1)
    flat = out.view(-1)
    for s in range(0, len(ia), chunk):
        i, j = ia[s:s + chunk], ib[s:s + chunk]
        mu_p, mu_t = mu_a[i], mu_b[j]
        mu_pp, mu_tt, mu_pt = mu_p.pow(2), mu_t.pow(2), mu_p * mu_t
        var_p = torch.clamp(sq_a[i] - mu_pp, min=0.0)
        var_t = torch.clamp(sq_b[j] - mu_tt, min=0.0)
        cov = window(pa[i] * pb[j]) - mu_pt
        upper = 2 * cov + c2
        lower = var_p + var_t + c2
        ssim_map = ((2 * mu_pt + c1) * upper) / ((mu_pp + mu_tt + c1) * lower)
        flat[s:s + len(i)] = ssim_map.reshape(len(i), -1).mean(-1)
    return out


@dataclass
class MatchResult:
    """Reconstructions matched one-to-one to originals.

    ``perm[i]`` is the index of the reconstruction assigned to original ``i``,
    so ``reconstructions[perm]`` lines up with ``originals``; ``ssim``/``psnr``
    are the per-original metrics of that pairing.
    """

    perm: torch.Tensor
    ssim: torch.Tensor
    psnr: torch.Tensor


def match_reconstructions(
    reconstructions: torch.Tensor, originals: torch.Tensor, value_range: ValueRange = DEFAULT_VALUE_RANGE
) -> MatchResult:
    """Hungarian matching maximising total SSIM (a batch attack returns images in arbitrary order)."""
    reconstructions, originals = _as_batch(reconstructions, "reconstructions"), _as_batch(originals, "originals")
    if reconstructions.shape != originals.shape:
        raise ValueError(
            f"reconstructions and originals shapes differ: {tuple(reconstructions.shape)} vs {tuple(originals.shape)}"
        )
    sim = pairwise_ssim(originals, reconstructions, value_range)  # rows: originals, cols: reconstructions
    rows, cols = linear_sum_assignment(-sim.numpy().astype(np.float64))
    perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    matched = reconstructions[perm]
    return MatchResult(perm, ssim(matched, originals, value_range), psnr(matched, originals, value_range))
