"""Plaintext training with Lightning Fabric: the centralized and local-only baselines.

These two regimes bracket every privacy-preserving regime: ``centralized``
pools all hospitals' data (the accuracy one could reach if pooling were
allowed) and ``local`` trains each site alone (what a hospital gets without
collaboration). Run it as ``splitfl train --config FILE --out DIR`` or with
Lightning's launcher::

    fabric run splitfl/train.py --config configs/quickstart.yaml --out runs/quickstart

Every epoch writes an atomic checkpoint; rerunning the same command on the
same ``--out`` resumes from it and reproduces the uninterrupted run.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # launched as a script (fabric run / torchrun): don't let splitfl/* shadow top-level modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import dataclasses
import math
import time
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from splitfl.artifacts import save_checkpoint, write_csv, write_json, write_text
from splitfl.config import RunConfig, TrainConfig, with_defaults
from splitfl.data import DataSplits, load_splits, partition_dataset
from splitfl.data.base import ArrayDataset
from splitfl.metrics import TaskMetrics, make_loss
from splitfl.models import build_split_model
from splitfl.models.embeddings import embedded_dataset
from splitfl.plots import plot_learning_curves

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "best_model.pt"


class RunError(RuntimeError):
    """A run cannot start or resume as asked; the message says what to do."""


# ----------------------------------------------------------------------------- setup


def make_fabric(cfg: TrainConfig) -> Fabric:
    """A Fabric for this run; under ``fabric run`` the launcher's flags win."""
    from lightning.fabric.connector import _is_using_cli

    if _is_using_cli():
        return Fabric()
    return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, precision=cfg.precision)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise RunError("no trainable parameters: the encoder is frozen and the head has none")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    if cfg.scheduler == "multistep":  # the MedMNIST v2 schedule: x0.1 at 50% and 75% of training
        milestones = [int(0.5 * cfg.epochs), int(0.75 * cfg.epochs)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return None


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> DataLoader:
    """Shuffled loader whose order depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=len(dataset) > batch_size)


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _resume_key(cfg: RunConfig) -> dict[str, Any]:
    """The parts of a config that must match to resume: all but display and evaluation settings.

    ``train.epochs`` is included because the learning-rate schedule depends on it.
    """
    d = config_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("progress", "eval_batch_size")}
    return d


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def load_resume_state(path: Path, key: dict[str, Any], default_key: dict[str, Any], error: type[Exception],
                      what: str = "a run") -> dict[str, Any]:
    """A checkpoint's state, refused with the keys that differ when it was saved under another configuration.

    ``key`` is this run's resume key; the saved one is completed with ``default_key`` first, since keys added to
    splitfl after a run was saved were at their defaults in it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt file: say so instead of a pickle traceback
        raise error(f"{path}: cannot read checkpoint ({exc}); delete it to start over") from exc
    saved = with_defaults(state.get("resume_key") or {}, default_key)
    if saved != key:
        changed = "; ".join(_differences(saved, key))
        raise error(f"{Path(path).parent} holds {what} with a different configuration ({changed}); use another --out, "
                    "or delete the folder to start over")
    return state


# ----------------------------------------------------------------------------- loops


def train_one_epoch(
    fabric: Fabric,
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    desc: str,
    progress: bool,
) -> float:
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and fabric.is_global_zero))
    for images, targets in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), targets)
        if not torch.isfinite(loss):
            raise RunError(f"{desc}: loss became {loss.item()}; lower train.lr or check the data")
        fabric.backward(loss)
        optimizer.step()
        total += loss.item() * len(targets)
        count += len(targets)
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


# ----------------------------------------------------------------------------- one model


class PlainRunner:
    """One model trained on pooled (or one site's) plaintext data with Fabric."""

    def __init__(self, fabric: Fabric, cfg: RunConfig, splits: DataSplits, train_set: ArrayDataset) -> None:
        self.fabric, self.cfg, self.train_set = fabric, cfg, train_set
        self.split_model, load_report = build_split_model(
            cfg.model, splits.task.num_outputs, splits.task.n_channels, cfg.data.size
        )
        if load_report is not None:
            fabric.print(str(load_report))
        trainable = [p for p in self.split_model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, cfg.train)
        self.scheduler = make_scheduler(self.optimizer, cfg.train)
        self.loss_fn = make_loss(splits.task)
        # A frozen encoder (linear probe): embeddings computed once per image, only the head runs per batch.
        self.cached = self.split_model.encoder_frozen
        self._embedded: dict[int, Dataset] = {}
        trained = self.split_model.head if self.cached else self.split_model
        if self.cached:
            self.split_model.encoder.to(fabric.device)
        self.model, self.optimizer = fabric.setup(trained, self.optimizer)
        self.metrics = TaskMetrics(splits.task, device=fabric.device)

    def _inputs(self, dataset: ArrayDataset) -> Dataset:
        """The images, or their cached embeddings when the encoder is frozen."""
        if not self.cached:
            return dataset
        if id(dataset) not in self._embedded:
            self._embedded[id(dataset)] = embedded_dataset(
                self.split_model.encoder, dataset, self.cfg.train.eval_batch_size, self.fabric.device)
        return self._embedded[id(dataset)]

    def train_epoch(self, epoch: int, desc: str) -> float:
        data = self._inputs(self.train_set)
        loader = self.fabric.setup_dataloaders(epoch_loader(data, self.cfg.train.batch_size, self.cfg.seed, epoch))
        loss = train_one_epoch(self.fabric, self.model, loader, self.optimizer, self.loss_fn, desc, self.cfg.train.progress)
        if self.scheduler is not None:
            self.scheduler.step()
        return loss

    def evaluate(self, dataset: ArrayDataset) -> dict[str, Any]:
        loader = self.fabric.setup_dataloaders(eval_loader(self._inputs(dataset), self.cfg.train.eval_batch_size))
        return evaluate(self.fabric, self.model, loader, self.metrics, self.loss_fn)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.split_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.split_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def model_state(self) -> dict[str, Any]:
        return self.split_model.state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.split_model.load_state_dict(state)

    def epoch_extras(self) -> dict[str, Any]:
        return {}

    def result_extras(self) -> dict[str, Any]:
        return {}


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
        state = load_resume_state(ckpt_path, _resume_key(cfg), _resume_key(RunConfig()), RunError)
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
                    "resume_key": _resume_key(cfg),
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


def best_model_payload(model_state: dict[str, Any], cfg: RunConfig, task: Any, best: dict[str, Any]) -> dict[str, Any]:
    """What later tools (attacks, reports) need to rebuild the model without the training code."""
    return {
        "model": model_state,
        "config": config_dict(cfg),
        "task": dataclasses.asdict(task),
        "epoch": best["epoch"],
        "val_auroc_macro": best["score"],
    }


# ----------------------------------------------------------------------------- regimes


def _summarise(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}


def train_plain(fabric: Fabric, cfg: RunConfig, splits: DataSplits, train_set: ArrayDataset, out_dir: Path, label: str) -> dict[str, Any]:
    fabric.seed_everything(cfg.seed, verbose=False)
    return fit(fabric, PlainRunner(fabric, cfg, splits, train_set), cfg, splits, out_dir, label)


def run_centralized(fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path) -> dict[str, Any]:
    result = train_plain(fabric, cfg, splits, splits.train, out_dir, "centralized")
    plot_learning_curves({"centralized": result["history"]}, out_dir / "learning_curves.png", f"centralized: {splits.task.name}")
    return {"val": result["val"], "test": result["test"], "best_epoch": result["best_epoch"], "n_train": result["n_train"]}


def run_local(fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path) -> dict[str, Any]:
    """Each site trains alone on its partition; all are tested on the shared test split.

    Model selection uses the shared validation split, which if anything flatters
    the local baseline, so its gap to collaborative regimes is not overstated.
    """
    sites = partition_dataset(splits.train, cfg.data.partition)
    per_site: dict[str, Any] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for i, site in enumerate(sites):
        name = f"site_{i}"
        site_dir = out_dir / "sites" / name
        result = train_plain(fabric, cfg, splits, site, site_dir, f"local {name}")
        if fabric.is_global_zero:
            write_json(site_dir / "metrics.json", {k: result[k] for k in ("val", "test", "best_epoch", "n_train")})
        per_site[name] = {k: result[k] for k in ("val", "test", "best_epoch", "n_train")}
        histories[name] = result["history"]
    plot_learning_curves(histories, out_dir / "learning_curves.png", f"local-only: {splits.task.name}")
    test_aurocs = [r["test"]["auroc_macro"] for r in per_site.values()]
    test_accs = [r["test"]["accuracy"] for r in per_site.values()]
    return {
        "test": {"auroc_macro": float(np.mean(test_aurocs)), "accuracy": float(np.mean(test_accs))},
        "test_auroc_macro_across_sites": _summarise(test_aurocs),
        "test_accuracy_across_sites": _summarise(test_accs),
        "sites": per_site,
    }


def run_split(fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path) -> dict[str, Any]:
    """split-plain / split-he: hospitals hold encoders, data and labels; the server holds the head."""
    from splitfl.split.runner import SplitRunner

    fabric.seed_everything(cfg.seed, verbose=False)
    runner = SplitRunner(fabric, cfg, splits, out_dir)
    try:
        result = fit(fabric, runner, cfg, splits, out_dir, cfg.regime)
    finally:
        runner.close()
    plot_learning_curves({cfg.regime: result["history"]}, out_dir / "learning_curves.png", f"{cfg.regime}: {splits.task.name}")
    return {k: v for k, v in result.items() if k != "history"}


def run_fed(fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path) -> dict[str, Any]:
    """fedavg / fedprox: sites train full models locally; the server averages their updates each round."""
    from splitfl.fed.runner import FedRunner

    fabric.seed_everything(cfg.seed, verbose=False)
    runner = FedRunner(fabric, cfg, splits, out_dir)
    result = fit(fabric, runner, cfg, splits, out_dir, cfg.regime)
    plot_learning_curves({cfg.regime: result["history"]}, out_dir / "learning_curves.png", f"{cfg.regime}: {splits.task.name}")
    return {k: v for k, v in result.items() if k != "history"}


REGIMES = {
    "centralized": run_centralized,
    "local": run_local,
    "split-plain": run_split,
    "split-he": run_split,
    "split-he-full": run_split,
    "fedavg": run_fed,
    "fedprox": run_fed,
}


def run(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Run one training job and write its artefacts to ``out``; returns what metrics.json holds."""
    if cfg.regime not in REGIMES:
        raise RunError(f"regime {cfg.regime!r} is not a plaintext training regime; choose one of {sorted(REGIMES)}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fabric = make_fabric(cfg.train)
    from lightning.fabric.connector import _is_using_cli

    if not _is_using_cli():  # under `fabric run` the launcher has already started the processes
        fabric.launch()
    t0 = time.perf_counter()
    splits = load_splits(cfg.data)
    fabric.print(
        f"task {splits.task.name} ({splits.task.task_type}, {splits.task.num_outputs} outputs): "
        f"train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)}; regime {cfg.regime}; "
        f"device {fabric.device}"
    )
    result = REGIMES[cfg.regime](fabric, cfg, splits, out_dir)
    return write_run_metrics(cfg, splits, result, t0, out_dir, fabric.print if fabric.is_global_zero else None)


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
        import yaml

        write_text(Path(out_dir) / "config.yaml", yaml.safe_dump(config_dict(cfg), sort_keys=False))
        write_json(Path(out_dir) / "metrics.json", metrics)
        report(f"test macro AUROC {metrics['test']['auroc_macro']:.4f}; results in {out_dir}/metrics.json")
    return metrics


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point for ``fabric run splitfl/train.py --config FILE --out DIR``."""
    from splitfl.cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
