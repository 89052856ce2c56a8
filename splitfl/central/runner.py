"""The centralized and local-only regimes: one model per data holder, trained in plaintext with Fabric.

These two bracket every privacy-preserving regime: ``centralized`` pools all
hospitals' data (the accuracy one could reach if pooling were allowed) and
``local`` trains each site alone (what a hospital gets without collaboration).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lightning.fabric import Fabric
from torch.utils.data import Dataset

from splitfl.artifacts import write_json
from splitfl.config import RunConfig
from splitfl.data import DataSplits, partition_dataset
from splitfl.data.base import ArrayDataset
from splitfl.engine import (
    epoch_loader,
    eval_loader,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
    summarise,
    supervised_loss,
    train_one_epoch,
)
from splitfl.metrics import TaskMetrics, make_loss
from splitfl.models import build_split_model
from splitfl.models.embeddings import embedded_dataset
from splitfl.plots import plot_learning_curves


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
        loss = train_one_epoch(self.fabric, self.model, loader, self.optimizer, supervised_loss(self.model, self.loss_fn),
                               desc, self.cfg.train.progress)
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
        "test_auroc_macro_across_sites": summarise(test_aurocs),
        "test_accuracy_across_sites": summarise(test_accs),
        "sites": per_site,
    }
