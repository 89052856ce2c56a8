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

**Chance level.** The rule can fire by luck: an attack that learned nothing
still has a nearest neighbour, and with probability ``1 / len(pool)`` it is the
true image. So each image also gets ``chance_i``: the probability of being
counted as leaked if the reconstruction carried nothing about *which* image it
came from. The hospital's images and the distractors come from one
distribution, so to such a reconstruction every pool image is equally likely
to be the true one: ``chance_i = 1[gain over its nearest neighbour >= margin] /
len(pool)``. :func:`chance_summary` turns these into the expected chance rate
and the probability of seeing at least the observed count by luck alone (a
one-sided p-value, exact Poisson-binomial).
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
    chance: torch.Tensor | None = None  # P(leaked by luck): 1[gain over the nearest neighbour >= margin] / pool size
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
    pool_mean_ssim = ssim(mean_image.expand_as(pool), pool, value_range)
    chance = (nearest_ssim - pool_mean_ssim[nearest] >= margin).double() / len(pool)
    return LeakageDetails(
        ssim=rec_ssim, mean_ssim=mean_ssim, gain=gain, nearest=nearest, nearest_ssim=nearest_ssim,
        reidentified=reid, leaked=reid & (gain >= margin), margin=float(margin), chance=chance, perm=perm,
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


def chance_summary(chance: Sequence[float], leaked: int) -> dict[str, float]:
    """Expected leakage rate by luck, and P(at least ``leaked`` leaks by luck) (exact Poisson-binomial).

    ``chance``: the per-image ``chance_i`` of :func:`leak_flags` (images without a reconstruction: 0).
    A p-value near 1 says the observed leaks are what an attack that learned nothing would also show.
    """
    p = [float(c) for c in chance]
    dist = [1.0]  # dist[k] = P(k leaks by luck among the images seen so far)
    for pi in p:
        nxt = [0.0] * (len(dist) + 1)
        for k, q in enumerate(dist):
            nxt[k] += q * (1.0 - pi)
            nxt[k + 1] += q * pi
        dist = nxt
    return {"chance_leakage_rate": sum(p) / len(p) if p else 0.0,
            "chance_p_value": min(1.0, sum(dist[leaked:])) if leaked > 0 else 1.0}
