"""Score reconstructions against the images a hospital really used (its ground truth).

One observed message (a site's update, a batch of activations) was made from
``N`` images; an attack returns ``B`` reconstructions. They are paired by
Hungarian assignment on SSIM (rectangular when ``B != N``, e.g. several local
steps behind one update); an image without a reconstruction is not leaked.
Each pair is then judged by :func:`attacks.leakage.leak_flags` with a
re-identification pool of the hospital's *other* images plus at least
:data:`attacks.leakage.MIN_DISTRACTORS` images of the same distribution from
elsewhere (the task's test split).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from attacks.leakage import DEFAULT_MARGIN, leak_flags
from attacks.metrics import pairwise_ssim, psnr


@dataclass
class ScoredImage:
    """One original image and what the attack made of it."""

    observation: str  # e.g. "round 0 site 2"
    index: int  # the image's index in the site's data
    ssim: float
    psnr: float
    mean_ssim: float  # SSIM of the dataset-mean image against it (a know-nothing attacker)
    gain: float
    reidentified: bool
    leaked: bool
    chance: float = 0.0  # P(counted as leaked by luck), see attacks.leakage

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def distractor_pool(site_images: torch.Tensor, used: list[int], outside: torch.Tensor) -> torch.Tensor:
    """The hospital's images other than ``used``, then the outside images (same distribution)."""
    keep = torch.ones(len(site_images), dtype=torch.bool)
    keep[used] = False
    return torch.cat([site_images[keep], outside])


def score_observation(
    reconstructions: torch.Tensor,
    originals: torch.Tensor,
    indices: list[int],
    distractors: torch.Tensor,
    mean_image: torch.Tensor,
    label: str,
    margin: float = DEFAULT_MARGIN,
) -> tuple[list[ScoredImage], torch.Tensor]:
    """Per-original scores, and the reconstruction paired with each original (zeros where none was)."""
    rec = reconstructions.detach().cpu().float()
    orig = originals.detach().cpu().float()
    sim = pairwise_ssim(orig, rec).numpy().astype(np.float64)  # rows: originals
    rows, cols = linear_sum_assignment(-sim)
    paired = torch.full_like(orig, float("nan"))
    matched = np.zeros(len(orig), dtype=bool)
    for r, c in zip(rows, cols):
        paired[r] = rec[c]
        matched[r] = True
    scored: list[ScoredImage] = []
    have = torch.from_numpy(matched)
    details = leak_flags(paired[have], orig[have], distractors, mean_image=mean_image, margin=margin) if matched.any() else None
    values = psnr(paired[have], orig[have]) if matched.any() else None
    k = 0
    for i in range(len(orig)):
        if matched[i]:
            scored.append(ScoredImage(label, int(indices[i]), float(details.ssim[k]), float(values[k]),
                                      float(details.mean_ssim[k]), float(details.gain[k]),
                                      bool(details.reidentified[k]), bool(details.leaked[k]),
                                      float(details.chance[k])))
            k += 1
        else:
            scored.append(ScoredImage(label, int(indices[i]), float("nan"), float("nan"), float("nan"), float("nan"),
                                      False, False))
    return scored, torch.nan_to_num(paired, nan=0.0)


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Share of the batch's labels recovered, as multisets (a batch attack does not know the order)."""
    pred = predicted.reshape(-1).tolist()
    hits = 0
    for y in true.reshape(-1).tolist():
        if y in pred:
            pred.remove(y)
            hits += 1
    return hits / max(len(true.reshape(-1)), 1)


def curves(scored: list[ScoredImage]) -> dict[str, list[list[float]]]:
    """Leakage rate against the margin over the mean image, and the naive SSIM cut-off curve, for comparison."""
    reid = np.array([s.reidentified for s in scored], dtype=bool)
    gain = np.nan_to_num(np.array([s.gain for s in scored], dtype=np.float64), nan=-np.inf)
    ssim = np.nan_to_num(np.array([s.ssim for s in scored], dtype=np.float64), nan=-np.inf)
    margins = np.round(np.linspace(0.0, 0.5, 11), 3)
    cutoffs = np.round(np.linspace(0.0, 1.0, 11), 3)
    n = max(len(scored), 1)
    return {
        "leakage_vs_margin": [[float(m), float((reid & (gain >= m)).sum() / n)] for m in margins],
        "fraction_above_ssim_cutoff": [[float(t), float((ssim >= t).sum() / n)] for t in cutoffs],
    }
