"""Loss and evaluation metrics that follow the task type.

The headline number is macro AUROC (one-vs-rest, averaged over classes or
findings), as in the MedMNIST v2 benchmark. All metrics come from
torchmetrics so they are tested upstream and sync across processes.
"""
from __future__ import annotations

from typing import Any

import torch
import torchmetrics.classification as tmc
from torch import nn
from torchmetrics import MetricCollection

from splitfl.data.base import TaskInfo


def make_loss(task: TaskInfo) -> nn.Module:
    """Cross-entropy for single-label tasks (binary uses 2 logits), BCE for multilabel.

    Ordinal grades use cross-entropy too, like the MedMNIST baselines, so the
    macro AUROC is comparable; ordinal agreement is reported separately
    (quadratic-weighted kappa, mean absolute grade error).
    """
    return nn.BCEWithLogitsLoss() if task.multilabel else nn.CrossEntropyLoss()


def probabilities(logits: torch.Tensor, task: TaskInfo) -> torch.Tensor:
    """Model outputs as probabilities: sigmoid per finding or softmax over classes."""
    return torch.sigmoid(logits) if task.multilabel else torch.softmax(logits, dim=-1)


class TaskMetrics:
    """Accumulates predictions over an evaluation set and computes the task's metrics."""

    def __init__(self, task: TaskInfo, device: torch.device | str = "cpu") -> None:
        self.task = task
        k = task.num_outputs
        if task.multilabel:
            metrics: dict[str, Any] = {
                "auroc_macro": tmc.MultilabelAUROC(num_labels=k, average="macro"),
                "auroc_per_class": tmc.MultilabelAUROC(num_labels=k, average=None),
                "accuracy": tmc.MultilabelAccuracy(num_labels=k, average="micro"),
                "f1_macro": tmc.MultilabelF1Score(num_labels=k, average="macro"),
                "sensitivity_per_class": tmc.MultilabelRecall(num_labels=k, average=None),
                "specificity_per_class": tmc.MultilabelSpecificity(num_labels=k, average=None),
            }
        else:
            metrics = {
                "auroc_macro": tmc.MulticlassAUROC(num_classes=k, average="macro"),
                "auroc_per_class": tmc.MulticlassAUROC(num_classes=k, average=None),
                "accuracy": tmc.MulticlassAccuracy(num_classes=k, average="micro"),
                "balanced_accuracy": tmc.MulticlassRecall(num_classes=k, average="macro"),
                "f1_macro": tmc.MulticlassF1Score(num_classes=k, average="macro"),
            }
            if task.task_type == "binary":
                metrics["auroc_binary"] = tmc.BinaryAUROC()
                metrics["sensitivity"] = tmc.BinaryRecall()
                metrics["specificity"] = tmc.BinarySpecificity()
                metrics["f1"] = tmc.BinaryF1Score()
            if task.task_type == "ordinal":
                metrics["kappa_quadratic"] = tmc.MulticlassCohenKappa(num_classes=k, weights="quadratic")
        self._binary_keys = {"auroc_binary", "sensitivity", "specificity", "f1"}
        self.collection = MetricCollection(metrics, compute_groups=False).to(device)
        self._abs_grade_error = torch.zeros((), dtype=torch.float64)
        self._count = 0
        self._loss_sum = 0.0

    def reset(self) -> None:
        self.collection.reset()
        self._abs_grade_error.zero_()
        self._count = 0
        self._loss_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: float | None = None) -> None:
        probs = probabilities(logits.float(), self.task)
        targets = targets.long() if not self.task.multilabel else targets.int()
        for name, metric in self.collection.items():
            if name in self._binary_keys:
                metric.update(probs[:, 1], targets)
            else:
                metric.update(probs, targets)
        if self.task.task_type == "ordinal":
            self._abs_grade_error += (probs.argmax(-1) - targets).abs().sum().double().cpu()
        n = int(targets.shape[0])
        self._count += n
        if loss is not None:
            self._loss_sum += float(loss) * n

    def compute(self) -> dict[str, Any]:
        """Plain-Python results; per-class lists are keyed by label name."""
        out: dict[str, Any] = {}
        for name, value in self.collection.compute().items():
            value = value.detach().cpu()
            if value.ndim == 0:
                out[name] = float(value)
            else:
                out[name] = dict(zip(self.task.label_names, map(float, value.tolist())))
        if self.task.multilabel:
            sens = torch.tensor(list(out["sensitivity_per_class"].values()))
            spec = torch.tensor(list(out["specificity_per_class"].values()))
            out["balanced_accuracy"] = float(((sens + spec) / 2).mean())
        if self.task.task_type == "binary":
            out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
        if self.task.task_type == "ordinal" and self._count:
            out["grade_mae"] = float(self._abs_grade_error) / self._count
        if self._count and self._loss_sum:
            out["loss"] = self._loss_sum / self._count
        out["n"] = self._count
        return out
