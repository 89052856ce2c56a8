"""The epoch loop every regime shares: train, validate, keep the best model, checkpoint, resume, test.

A regime supplies a *runner* (one model for centralized/local; hospitals and a server for split
learning; sites and an aggregator for FedAvg) and :func:`fit` does the rest identically, so
regimes differ only in who computes what, never in model selection or bookkeeping.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from splitfl.artifacts import save_checkpoint, write_csv, write_json, write_text
from splitfl.config import RunConfig
from splitfl.data import DataSplits
from splitfl.engine.errors import RunError
from splitfl.engine.resume import BEST_MODEL, CHECKPOINT, best_model_payload, config_dict, load_resume_state, resume_key
from splitfl.metrics import TaskMetrics


def supervised_loss(model: nn.Module, loss_fn: nn.Module) -> Callable[[Any], tuple[torch.Tensor, int]]:
    """The batch loss of ``(images, targets)`` batches: what :func:`train_one_epoch` needs for labelled data."""
    def loss_of(batch: Any) -> tuple[torch.Tensor, int]:
        images, targets = batch
        return loss_fn(model(images), targets), len(targets)
    return loss_of


def train_one_epoch(
    fabric: Fabric,
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[Any], tuple[torch.Tensor, int]],
    desc: str,
    progress: bool,
    step_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    error: type[Exception] = RunError,
) -> float:
    """One pass over ``loader``; returns the mean loss per sample.

    ``loss_of(batch)`` gives the batch's loss and sample count (supervised: :func:`supervised_loss`;
    self-supervised pretraining: the method's loss), so every job shares one loop. ``step_scheduler``
    steps after every batch (pretraining's warm-up); epoch schedulers are stepped by the caller.
    A non-finite loss raises ``error`` with what to change.
    """
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and fabric.is_global_zero))
    for batch in bar:
        optimizer.zero_grad(set_to_none=True)
        loss, n = loss_of(batch)
        if not torch.isfinite(loss):
            raise error(f"{desc}: loss became {loss.item()}; lower train.lr or check the data")
        fabric.backward(loss)
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        total += loss.item() * n
        count += n
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


@torch.no_grad()
def evaluate(fabric: Fabric, model: nn.Module, loader: DataLoader, metrics: TaskMetrics, loss_fn: nn.Module) -> dict[str, Any]:
    model.eval()
    metrics.reset()
    for images, targets in loader:
        logits = model(images)
        metrics.update(logits, targets, loss=loss_fn(logits, targets).item())
    return metrics.compute()

def fit(fabric: Fabric, runner: Any, cfg: RunConfig, splits: DataSplits, out_dir: Path, label: str) -> dict[str, Any]:
    """The epoch loop shared by every regime: model selection on validation, atomic checkpoints, resume.

    ``runner`` owns the parties and their optimizers (one model for the plaintext
    regimes; hospitals and a server for split learning) and exposes
    ``train_epoch``, ``evaluate``, ``state_dict``/``load_state_dict``,
    ``model_state``/``load_model_state``, ``lr``, ``epoch_extras`` and ``result_extras``.
    """
    tcfg = cfg.train
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": -math.inf, "epoch": -1, "val": None}
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists():
        state = load_resume_state(ckpt_path, resume_key(cfg), resume_key(RunConfig()), RunError)
        runner.load_state_dict(state["runner"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
        fabric.print(f"[{label}] resuming from {ckpt_path} after epoch {state['epoch'] + 1}")

    for epoch in range(start_epoch, tcfg.epochs):
        t0 = time.perf_counter()
        lr = runner.lr()
        train_loss = runner.train_epoch(epoch, f"[{label}] epoch {epoch + 1}/{tcfg.epochs}")
        val = runner.evaluate(splits.val)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val.get("loss", float("nan")),
            "val_auroc_macro": val["auroc_macro"],
            "val_accuracy": val["accuracy"],
            "lr": lr,
            "seconds": time.perf_counter() - t0,
            **runner.epoch_extras(),
        }
        history.append(row)
        improved = val["auroc_macro"] > best["score"]
        if improved:
            best = {"score": val["auroc_macro"], "epoch": epoch + 1, "val": val}
        fabric.print(
            f"[{label}] epoch {epoch + 1}/{tcfg.epochs}  train_loss {train_loss:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_auroc {val['auroc_macro']:.4f}"
            f"{'  *best*' if improved else ''}  ({row['seconds']:.1f}s)"
        )
        if fabric.is_global_zero:
            if improved:
                save_checkpoint(out_dir / BEST_MODEL, best_model_payload(runner.model_state(), cfg, splits.task, best))
            save_checkpoint(
                ckpt_path,
                {
                    "runner": runner.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "best": best,
                    "torch_rng": torch.get_rng_state(),
                    "resume_key": resume_key(cfg),
                },
            )
            write_csv(out_dir / "history.csv", history)
        fabric.barrier()

    if best["epoch"] < 0:
        raise RunError(f"[{label}] no epoch was trained (train.epochs={tcfg.epochs})")
    best_state = torch.load(out_dir / BEST_MODEL, map_location="cpu", weights_only=False)
    runner.load_model_state(best_state["model"])
    test = runner.evaluate(splits.test)
    fabric.print(f"[{label}] best epoch {best['epoch']}: val_auroc {best['score']:.4f}  test_auroc {test['auroc_macro']:.4f}")
    return {
        "best_epoch": best["epoch"],
        "val": best["val"],
        "test": test,
        "history": history,
        "n_train": len(runner.train_set),
        **runner.result_extras(),
    }

def summarise(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}

def write_run_metrics(
    cfg: RunConfig, splits: DataSplits, result: dict[str, Any], t0: float, out_dir: Path, report: Any = print
) -> dict[str, Any]:
    """metrics.json and config.yaml for a finished run, the same for every regime and launcher.

    Written together at the end (not config.yaml at the start), so a run refused for a changed
    config leaves no stale pair. ``report`` None: another process writes them (not rank zero).
    """
    metrics = {
        "regime": cfg.regime,
        "task": {"name": splits.task.name, "type": splits.task.task_type, "labels": list(splits.task.label_names)},
        "data": {"source": splits.source, "train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "model": {"name": cfg.model.name, "cut": cfg.model.cut, "freeze_encoder": cfg.model.freeze_encoder},
        **{k: v for k, v in result.items() if k != "history"},
        "wall_seconds": time.perf_counter() - t0,
    }
    if report is not None:
        write_text(Path(out_dir) / "config.yaml", yaml.safe_dump(config_dict(cfg), sort_keys=False))
        write_json(Path(out_dir) / "metrics.json", metrics)
        report(f"test macro AUROC {metrics['test']['auroc_macro']:.4f}; results in {out_dir}/metrics.json")
    return metrics
