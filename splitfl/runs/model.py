"""Rebuild the model a training run released, whatever its regime, from the run's own files.

Every regime writes ``best_model.pt`` (:func:`splitfl.engine.best_model_payload`): the model's state,
the run config and the task. The model is rebuilt exactly as the run built it (the federated
regimes swap BatchNorm for GroupNorm; split regimes keep encoder and head under one module) and
the weights are loaded strictly, so a report is always about the weights that were evaluated.
``metrics.json`` (test metrics, the privacy section of DP runs) is read beside it for the model card.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from splitfl.config import run_config_from_dict
from splitfl.data.base import TaskInfo
from splitfl.errors import UserError
from splitfl.fed.server import build_fed_model
from splitfl.models import build_split_model

FED_REGIMES = ("fedavg", "fedprox")


class RunLoadError(UserError, ValueError):
    """A run folder that cannot be turned into a model: says which file and what to do."""


@dataclass
class TrainedRun:
    """A released model with what a model card needs to say about it."""

    run_dir: Path
    model: nn.Module  # eval mode, CPU, maps images in [-1, 1] to logits
    config: Any  # splitfl.config.RunConfig
    task: Any  # splitfl.data.base.TaskInfo
    metrics: dict[str, Any]  # metrics.json ({} when absent)
    best_epoch: Optional[int]

    @property
    def regime(self) -> str:
        """The regime as trained: FedAvg variants carry their encryption/DP in the config, so name them."""
        regime = self.config.regime
        if regime in FED_REGIMES:
            fed = self.config.fed
            if fed.dp_noise_multiplier > 0 or fed.dp_target_epsilon is not None:
                regime += "+dp"
            if fed.secure != "none":  # fedavg+he, fedavg+masks
                regime += f"+{fed.secure}"
        return regime

    @property
    def epsilon(self) -> Optional[float]:
        """The (largest per-site) epsilon a DP run spent, from metrics.json; None without DP."""
        eps = (self.metrics.get("privacy") or {}).get("epsilon")
        return float(eps) if isinstance(eps, (int, float)) else None

    @property
    def delta(self) -> Optional[float]:
        privacy = self.metrics.get("privacy") or {}
        return privacy.get("delta")


def _read_payload(path: Path) -> dict[str, Any]:
    if not path.is_file() and (path.parent / "sites").is_dir():
        sites = sorted(p.name for p in (path.parent / "sites").iterdir() if (p / "best_model.pt").is_file())
        raise RunLoadError(f"{path.parent}: a 'local' run keeps one model per hospital; pass one of them, e.g. "
                           f"--run {path.parent / 'sites' / (sites[0] if sites else 'site_0')}")
    if not path.is_file():
        raise RunLoadError(f"{path}: no best_model.pt; pass the output folder of a finished `splitfl train` run "
                           "(it holds best_model.pt, metrics.json and config.yaml)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or not a torch file
        raise RunLoadError(f"{path}: cannot be read as a splitfl model ({exc}); was the run interrupted? "
                           "Train again or point at another run") from exc
    missing = [k for k in ("model", "config", "task") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise RunLoadError(f"{path}: missing {missing}; it was not written by `splitfl train` (best_model_payload)")
    return payload


def build_run_model(cfg: Any, task: Any) -> nn.Module:
    """The untrained module of the run's regime (no pretrained file is read: the run's weights replace it)."""

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
    if cfg.regime in FED_REGIMES:
        return build_fed_model(cfg, task.num_outputs, task.n_channels)
    return build_split_model(cfg.model, task.num_outputs, task.n_channels, cfg.data.size)[0]


def load_run(run_dir: str | Path) -> TrainedRun:
    """The model of ``run_dir/best_model.pt`` in eval mode, with its config, task and metrics."""

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunLoadError(f"--run {run_dir}: no such folder; pass the --out folder of `splitfl train`")
    payload = _read_payload(run_dir / "best_model.pt")
    cfg = run_config_from_dict(payload["config"])
    t = payload["task"]
    task = TaskInfo(t["name"], t["task_type"], tuple(t["label_names"]), int(t["n_channels"]))
    model = build_run_model(cfg, task)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise RunLoadError(f"{run_dir / 'best_model.pt'}: the weights do not fit the model its config describes "
                           f"({cfg.model.name}, regime {cfg.regime}): {str(exc).splitlines()[0]}") from exc
    model.eval()
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return TrainedRun(run_dir, model, cfg, task, metrics, payload.get("epoch"))
