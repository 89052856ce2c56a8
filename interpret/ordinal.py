"""Explaining ordinal grading (diabetic-retinopathy grades 0-4): evidence per grade and for a higher vs a lower grade.

A grading report has to answer "why grade 3 and not 2 or 4?", which the predicted-class map alone
cannot. For a run whose task type is ``ordinal`` this module gives:

* the grade's words (:func:`grade_words`): the run's label names, or the ICDR scale for RetinaMNIST,
  whose label names are bare digits;
* **per-grade maps** (:func:`per_grade_maps`): for every grade k the attribution of P(grade k | x)
  (the softmax output, not the logit: probabilities of all grades sum to 1, so a pixel that raises one
  grade must lower another, and the row shows where the evidence moves probability between grades);
* the **ordinal contrast** (:func:`contrast_maps`): the attribution of the expected grade
  E[g] = sum_k k * P(grade k | x). Positive pixels push towards a higher grade, negative ones towards a
  lower grade. One map per image, whatever the predicted grade, and for Integrated Gradients exactly
  sum_k k * (grade-k map) (IG is linear in the explained output), so it is consistent with the row.
  Through the softmax, 32 IG steps can be far too few, so :func:`grade_maps` doubles them per image
  until completeness holds (:func:`adaptive_ig_steps`);
* the cohort's grading agreement (:func:`grading_metrics`): the grade confusion matrix, quadratic-weighted
  kappa and mean absolute grade error, computed by :class:`splitfl.metrics.TaskMetrics`, the code that
  scores training runs, so the report and ``metrics.json`` cannot disagree on a definition.

Every map comes from :func:`interpret.attributions.attribute` (Captum) run on a thin wrapper module
(:class:`GradeProbabilities`, :class:`ExpectedGrade`) whose outputs are the quantity explained.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_confusion_matrix

from interpret.attributions import attribute, ig_completeness_gap
from interpret.options import DEFAULT_ORDINAL_METHODS, METHODS
from splitfl.data.base import TaskInfo
from splitfl.metrics import TaskMetrics

__all__ = [
    "CONTRAST_DEFINITION",
    "DEFAULT_ORDINAL_METHODS",
    "ICDR_WORDS",
    "IG_MAX_STEPS",
    "IG_START_STEPS",
    "IG_TOLERANCE",
    "ExpectedGrade",
    "GradeMaps",
    "GradeProbabilities",
    "adaptive_ig_steps",
    "contrast_maps",
    "expected_grade",
    "grade_maps",
    "grade_phrase",
    "grade_words",
    "grading_metrics",
    "map_summaries",
    "per_grade_maps",
]

# International Clinical Diabetic Retinopathy scale, short words (grades 1-3 are non-proliferative DR).
ICDR_WORDS: tuple[str, ...] = ("no DR", "mild", "moderate", "severe", "proliferative")
# Integrated Gradients of the contrast: steps doubled from 32 up to 256 until the attributions add up to
# E[g](x) - E[g](baseline) within 0.05 grades (completeness), image by image (see adaptive_ig_steps).
IG_START_STEPS = 32
IG_MAX_STEPS = 256
IG_TOLERANCE = 0.05
CONTRAST_DEFINITION = ("the expected grade E[g] = Σ k·P(grade k): pixels that raise it push towards a higher "
                       "grade, pixels that lower it towards a lower grade")


def grade_words(label_names: Sequence[str]) -> list[str]:
    """A word per grade: the label name, or the ICDR word where the names are bare digits 0-4 (RetinaMNIST)."""
    names = [str(n).strip() for n in label_names]
    if len(names) == len(ICDR_WORDS) and names == [str(k) for k in range(len(names))]:
        return list(ICDR_WORDS)
    return names


def grade_phrase(k: int, words: Sequence[str]) -> str:
    """``"grade 3 (severe)"``; just ``"grade 3"`` when the grade has no word beyond its number."""
    word = words[k]
    return f"grade {k}" if word == str(k) else f"grade {k} ({word})"


def expected_grade(probs: torch.Tensor) -> torch.Tensor:
    """E[g] = sum_k k * p_k per row of ``(B, K)`` grade probabilities, ``(B,)``."""
    grades = torch.arange(probs.shape[1], dtype=probs.dtype, device=probs.device)
    return probs @ grades


class GradeProbabilities(nn.Module):
    """The model with softmax on top: Captum's ``target=k`` then explains P(grade k), not grade k's logit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


class ExpectedGrade(nn.Module):
    """The model reduced to one output, E[g] = sum_k k * P(grade k): the ordinal contrast explained with ``target=0``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expected_grade(torch.softmax(self.model(x), dim=1))[:, None]


def _check_methods(methods: Sequence[str], where: str) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"{where}: unknown method(s) {unknown}; choose from {list(METHODS)}.")
    return list(methods)


def _check_steps(ig_steps: torch.Tensor | None, n_images: int, where: str) -> torch.Tensor | None:
    if ig_steps is None:
        return None
    steps = torch.as_tensor(ig_steps).long().reshape(-1)
    if steps.numel() != n_images or bool((steps < 1).any()):
        raise ValueError(f"{where}: ig_steps must hold one positive step count per image ({n_images}), "
                         f"got {ig_steps!r}.")
    return steps


def _attribute(wrapped: nn.Module, images: torch.Tensor, target: int, method: str, steps: torch.Tensor | None,
               batch_size: int, progress: bool) -> torch.Tensor:
    """:func:`attribute`, with Integrated Gradients run per group of images that need the same number of steps."""
    if method != "integrated_gradients" or steps is None:
        return attribute(wrapped, images, target, method, batch_size=batch_size, progress=progress)
    out = torch.empty(images.shape[0], *images.shape[2:])
    for s in steps.unique().tolist():
        idx = torch.nonzero(steps == s).flatten()
        out[idx] = attribute(wrapped, images[idx], target, method, batch_size=batch_size, progress=progress,
                             n_steps=int(s))
    return out


def per_grade_maps(model: nn.Module, images: torch.Tensor, n_grades: int, methods: Sequence[str], *,
                   batch_size: int = 16, progress: bool = False,
                   ig_steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{method: (B, K, H, W)}``: for each grade k, the attribution of P(grade k | x) (Captum, via :func:`attribute`).

    ``ig_steps``: Integrated Gradients steps per image (default: :func:`attribute`'s 32).
    """
    methods = _check_methods(methods, "per_grade_maps")
    if n_grades < 2:
        raise ValueError(f"per_grade_maps: an ordinal task has at least 2 grades, got n_grades={n_grades}.")
    steps = _check_steps(ig_steps, images.shape[0], "per_grade_maps")
    wrapped = GradeProbabilities(model)
    return {m: torch.stack([_attribute(wrapped, images, k, m, steps, batch_size, progress)
                            for k in range(n_grades)], dim=1) for m in methods}


def contrast_maps(model: nn.Module, images: torch.Tensor, methods: Sequence[str], *, batch_size: int = 16,
                  progress: bool = False, ig_steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{method: (B, H, W)}``: the attribution of the expected grade E[g] (the ordinal contrast)."""
    methods = _check_methods(methods, "contrast_maps")
    steps = _check_steps(ig_steps, images.shape[0], "contrast_maps")
    wrapped = ExpectedGrade(model)
    return {m: _attribute(wrapped, images, 0, m, steps, batch_size, progress) for m in methods}


def adaptive_ig_steps(model: nn.Module, images: torch.Tensor, *, tolerance: float = IG_TOLERANCE,
                      start_steps: int = IG_START_STEPS, max_steps: int = IG_MAX_STEPS, batch_size: int = 16,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integrated Gradients of E[g] with the steps doubled, image by image, until completeness holds.

    Through a softmax the path from the grey baseline to the image can be steep (a trained model's E[g]
    jumped by 3 grades within a tenth of the path): 32 steps then missed E[g](x) - E[g](baseline) by up to
    1.9 grades. Each image whose gap exceeds ``tolerance`` (in grades) is redone with twice the steps, up
    to ``max_steps``. Returns the maps ``(B, H, W)``, the steps used ``(B,)`` and the remaining gaps ``(B,)``.
    """
    if not (0 < start_steps <= max_steps) or tolerance <= 0:
        raise ValueError(f"adaptive_ig_steps: need 0 < start_steps ({start_steps}) <= max_steps ({max_steps}) "
                         f"and tolerance > 0 (got {tolerance}).")
    wrapped = ExpectedGrade(model)
    b = images.shape[0]
    steps = torch.full((b,), int(start_steps), dtype=torch.long)
    maps = attribute(wrapped, images, 0, "integrated_gradients", batch_size=batch_size, progress=progress,
                     n_steps=int(start_steps))
    gap = ig_completeness_gap(wrapped, images, 0, maps).float()
    s = int(start_steps)
    while s < max_steps:
        todo = torch.nonzero(gap.abs() > tolerance).flatten()
        if not todo.numel():
            break
        s = min(2 * s, int(max_steps))
        maps[todo] = attribute(wrapped, images[todo], 0, "integrated_gradients", batch_size=batch_size,
                               progress=progress, n_steps=s)
        gap[todo] = ig_completeness_gap(wrapped, images[todo], 0, maps[todo]).float()
        steps[todo] = s
    return maps, steps, gap


@dataclass
class GradeMaps:
    """Everything :func:`grade_maps` computes for a set of images."""

    per_grade: dict[str, torch.Tensor]  # method -> (B, K, H, W), attribution of P(grade k)
    contrast: dict[str, torch.Tensor]  # method -> (B, H, W), attribution of E[g]
    ig_steps: torch.Tensor | None  # (B,) Integrated Gradients steps per image; None without IG
    contrast_gap: torch.Tensor | None  # (B,) sum(IG contrast) - (E[g](x) - E[g](baseline)), in grades
    per_grade_gap: torch.Tensor | None  # (B, K) the same for each grade's probability


def grade_maps(model: nn.Module, images: torch.Tensor, n_grades: int, methods: Sequence[str], *,
               batch_size: int = 16, progress: bool = False, ig_tolerance: float = IG_TOLERANCE,
               ig_max_steps: int = IG_MAX_STEPS) -> GradeMaps:
    """Per-grade and contrast maps for ``methods``; Integrated Gradients with steps chosen by :func:`adaptive_ig_steps`.

    The grade maps reuse the contrast's steps per image, so the contrast stays Σ k × (grade-k map).
    """
    methods = _check_methods(methods, "grade_maps")
    steps = contrast_gap = per_grade_gap = None
    contrast: dict[str, torch.Tensor] = {}
    if "integrated_gradients" in methods:
        contrast["integrated_gradients"], steps, contrast_gap = adaptive_ig_steps(
            model, images, tolerance=ig_tolerance, max_steps=ig_max_steps, batch_size=batch_size, progress=progress)
    others = [m for m in methods if m != "integrated_gradients"]
    contrast.update(contrast_maps(model, images, others, batch_size=batch_size, progress=progress))
    contrast = {m: contrast[m] for m in methods}
    per_grade = per_grade_maps(model, images, n_grades, methods, batch_size=batch_size, progress=progress,
                               ig_steps=steps)
    if steps is not None:
        probs = GradeProbabilities(model)
        per_grade_gap = torch.stack([ig_completeness_gap(probs, images, k, per_grade["integrated_gradients"][:, k])
                                     for k in range(n_grades)], dim=1).float()
    return GradeMaps(per_grade, contrast, steps, contrast_gap, per_grade_gap)


def map_summaries(maps: torch.Tensor) -> list[dict[str, Any]]:
    """Per map of ``(B, H, W)``: total, positive and negative mass and the peak pixel (row, column), for the JSON."""
    if maps.dim() != 3:
        raise ValueError(f"map_summaries: expected (B, H, W) maps, got shape {tuple(maps.shape)}.")
    flat = maps.detach().double().reshape(maps.shape[0], -1)
    peak = flat.argmax(dim=1)
    w = maps.shape[-1]
    return [{"sum": float(f.sum()), "positive": float(f.clamp_min(0).sum()), "negative": float(f.clamp_max(0).sum()),
             "max": float(f.max()), "min": float(f.min()), "peak": [int(p) // w, int(p) % w]}
            for f, p in zip(flat, peak)]


def _finite_or_none(value: Any) -> float | None:
    v = float(value)
    return None if math.isnan(v) or math.isinf(v) else v


def grading_metrics(logits: torch.Tensor, labels: np.ndarray | torch.Tensor, task: TaskInfo) -> dict[str, Any]:
    """Grade confusion matrix (rows true, columns predicted), quadratic-weighted kappa, mean absolute grade error.

    Kappa and the grade error come from :class:`splitfl.metrics.TaskMetrics` (torchmetrics' Cohen kappa with
    quadratic weights), as in the run's ``metrics.json``. Kappa is None where it is undefined (every image
    has the same true and predicted grade: 0/0).
    """
    if task.task_type != "ordinal":
        raise ValueError(f"grading_metrics: task {task.name!r} is {task.task_type}, not ordinal.")
    y = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != y.shape[0] or logits.shape[1] != task.num_outputs:
        raise ValueError(f"grading_metrics: logits of shape {tuple(logits.shape)} for {y.shape[0]} labels and "
                         f"{task.num_outputs} grades; expected ({y.shape[0]}, {task.num_outputs}).")
    if y.numel() and (y.min() < 0 or y.max() >= task.num_outputs):
        raise ValueError(f"grading_metrics: labels must be grades 0..{task.num_outputs - 1}, got "
                         f"{sorted(set(y.tolist()))}.")
    metrics = TaskMetrics(task)
    with warnings.catch_warnings():  # AUROC of a grade absent from a small cohort warns; it is not reported here
        warnings.simplefilter("ignore", UserWarning)
        metrics.update(logits.detach().float().cpu(), y)
        res = metrics.compute()
    probs = torch.softmax(logits.detach().double().cpu(), dim=1)
    eg = expected_grade(probs)
    cm = multiclass_confusion_matrix(logits.detach().float().cpu().argmax(1), y, num_classes=task.num_outputs)
    return {
        "confusion_matrix": cm.tolist(),
        "quadratic_weighted_kappa": _finite_or_none(res["kappa_quadratic"]),
        "mean_absolute_grade_error": _finite_or_none(res["grade_mae"]),
        "mean_expected_grade_by_true_grade": [float(eg[y == k].mean()) if bool((y == k).any()) else None
                                              for k in range(task.num_outputs)],
        "n": int(y.numel()),
    }
