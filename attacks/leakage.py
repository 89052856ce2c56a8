"""Leakage rate: how many of a hospital's images an attack actually recovered.

A plain "SSIM above t" count is misleading on medical images: a blurry
dataset-mean image already scores high SSIM against every chest X-ray, so an
attack that learned nothing would look successful. Image ``i`` therefore
counts as *leaked* only when both hold:

1. **re-identification** - among a pool made of the hospital's own images plus
   at least ``MIN_DISTRACTORS`` other images of the same distribution, the
   reconstruction's nearest neighbour by SSIM is the true image ``i``; and
2. **gain over the mean** - ``SSIM(rec_i, img_i) - SSIM(mean_image, img_i) >= margin``.

Reconstructions are assumed already aligned with originals (pass
``match=True`` to align them by Hungarian matching first).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attacks.metrics import (
    DEFAULT_VALUE_RANGE,
    ValueRange,
    match_reconstructions,
    pairwise_ssim,
    ssim,
)

MIN_DISTRACTORS = 100
DEFAULT_MARGIN = 0.1


@dataclass
class LeakageDetails:
    """Per-image evidence behind the leak flags (all tensors have length N)."""

    ssim: torch.Tensor  # SSIM(rec_i, img_i)
    mean_ssim: torch.Tensor  # SSIM(mean_image, img_i): what a know-nothing attacker gets
    gain: torch.Tensor  # ssim - mean_ssim
    nearest: torch.Tensor  # index into the pool (originals first, then distractors) of rec_i's nearest neighbour
    nearest_ssim: torch.Tensor
    reidentified: torch.Tensor  # bool: nearest == i
    leaked: torch.Tensor  # bool: reidentified and gain >= margin
    margin: float
    perm: torch.Tensor | None = None  # Hungarian permutation applied to the reconstructions, if any

    @property
    def rate(self) -> float:
        return float(self.leaked.float().mean())


def _check(reconstructions: torch.Tensor, originals: torch.Tensor, distractors: torch.Tensor,
           mean_image: torch.Tensor | None) -> None:
    if reconstructions.ndim != 4 or reconstructions.shape != originals.shape:
        raise ValueError(
            "reconstructions and originals must both be (N, C, H, W) of the same shape, got "
            f"{tuple(reconstructions.shape)} and {tuple(originals.shape)}"
        )
    if distractors.ndim != 4 or distractors.shape[1:] != originals.shape[1:]:
        raise ValueError(
            f"distractors must be (M, C, H, W) with C, H, W = {tuple(originals.shape[1:])}, got {tuple(distractors.shape)}"
        )
    if len(distractors) < MIN_DISTRACTORS:
        raise ValueError(
            f"the re-identification pool needs at least {MIN_DISTRACTORS} distractor images of the same "
            f"distribution (got {len(distractors)}); with fewer, nearest-neighbour re-identification is too easy"
        )
    if mean_image is not None and mean_image.reshape(-1).numel() != originals[0].numel():
        raise ValueError(f"mean_image must have shape {tuple(originals.shape[1:])}, got {tuple(mean_image.shape)}")


def leak_flags(
    reconstructions: torch.Tensor,
    originals: torch.Tensor,
    distractors: torch.Tensor,
    mean_image: torch.Tensor | None = None,
    margin: float = DEFAULT_MARGIN,
    value_range: ValueRange = DEFAULT_VALUE_RANGE,
    match: bool = False,
) -> LeakageDetails:
    """Per-image leak flags and their evidence.

    ``mean_image`` defaults to the pixel mean of the distractors (same
    distribution, and it never contains the targets). All images are in the
    model's ``value_range``.
    """
    _check(reconstructions, originals, distractors, mean_image)
    perm = None
    if match:
        perm = match_reconstructions(reconstructions, originals, value_range).perm
        reconstructions = reconstructions[perm]
    if mean_image is None:
        mean_image = distractors.float().mean(dim=0)
    mean_image = mean_image.reshape(originals.shape[1:]).to(originals.dtype)
    n = len(originals)
    rec_ssim = ssim(reconstructions, originals, value_range)
    mean_ssim = ssim(mean_image.expand_as(originals), originals, value_range)
    pool = torch.cat([originals, distractors.to(originals.dtype)])
    sims = pairwise_ssim(reconstructions, pool, value_range)
    nearest_ssim, nearest = sims.max(dim=1)
    reid = nearest == torch.arange(n)
    gain = rec_ssim - mean_ssim
    return LeakageDetails(
        ssim=rec_ssim, mean_ssim=mean_ssim, gain=gain, nearest=nearest, nearest_ssim=nearest_ssim,
        reidentified=reid, leaked=reid & (gain >= margin), margin=float(margin), perm=perm,
    )


def leakage_rate(reconstructions: torch.Tensor, originals: torch.Tensor, distractors: torch.Tensor,
                 **kwargs) -> float:
    """Fraction of originals that are leaked; keyword arguments as for ``leak_flags``."""
    return leak_flags(reconstructions, originals, distractors, **kwargs).rate


def leakage_curve(details: LeakageDetails, margins: Sequence[float]) -> list[tuple[float, float]]:
    """Leakage rate as a function of the margin over the mean image: [(margin, rate), ...]."""
    return [(float(m), float((details.reidentified & (details.gain >= m)).float().mean())) for m in margins]


def ssim_cutoff_curve(details: LeakageDetails, thresholds: Sequence[float]) -> list[tuple[float, float]]:
    """The naive alternative, for comparison: fraction with SSIM >= t, no re-identification, no mean baseline."""
    return [(float(t), float((details.ssim >= t).float().mean())) for t in thresholds]
