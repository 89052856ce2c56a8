"""The server's round loop: :class:`RemoteFedRunner`, the runner :func:`splitfl.engine.fit` drives.

``splitfl serve`` (:func:`splitfl.net.launch.serve`) builds the global model, the
:class:`~splitfl.fed.server.FedServerCore` and the :class:`~splitfl.net.fed.servicer.FederationServer`, serves
them (:func:`~splitfl.net.fed.servicer.make_server`) and runs :func:`splitfl.engine.fit`, the epoch loop of
``splitfl train``, with :class:`RemoteFedRunner`: each ``train_epoch`` waits for every site to have joined,
opens one round on the server and blocks until it is aggregated; ``evaluate`` runs the global model on the
server. Checkpoints hold the core's books, the learning-rate schedule and the sites' reported epsilons, so
checkpoints, resume, ``metrics.json`` and ``history.csv`` are exactly those of the in-process run.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from splitfl.config import RunConfig
from splitfl.engine import eval_loader, make_scheduler
from splitfl.fed.flat import FlatSpec
from splitfl.fed.server import fed_privacy_summary
from splitfl.metrics import TaskMetrics, make_loss
from splitfl.net.fed.servicer import FederationServer


class RemoteFedRunner:
    """The runner :func:`splitfl.engine.fit` drives on the server: each ``train_epoch`` is one round over gRPC."""

    def __init__(self, fabric: Any, cfg: RunConfig, splits: Any, server: FederationServer, model: torch.nn.Module, join_timeout: float) -> None:
        self.fabric, self.cfg, self.server = fabric, cfg, server
        self.core = server.core
        self.model = model
        self.spec = FlatSpec(model)
        self.loss_fn = make_loss(splits.task)
        self.metrics = TaskMetrics(splits.task, device="cpu")
        self.train_set = splits.train  # only its length is reported (n_train)
        self.join_timeout = join_timeout
        self._lr_holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
        self._lr_sched = make_scheduler(self._lr_holder, cfg.train)
        self._extras: dict[str, Any] = {}
        self._epsilon_history: list[list[float]] = []

    def train_epoch(self, epoch: int, desc: str) -> float:
        self.server.wait_for_sites(self.join_timeout, epoch)
        loss, self._extras = self.server.run_round(epoch, self.lr())
        self.spec.load_into(self.model, self.core.global_flat)
        if self._lr_sched is not None:
            self._lr_holder.step()
            self._lr_sched.step()
        if self.server.epsilons:
            eps = [self.server.epsilons.get(i, math.nan) for i in range(self.server.num_sites)]
            self._epsilon_history.append(eps)
            self._extras["epsilon_max"] = float(np.nanmax(eps))
        return loss

    def evaluate(self, dataset: Any) -> dict[str, Any]:
        self.model.eval()
        self.metrics.reset()
        with torch.no_grad():
            for images, targets in eval_loader(dataset, self.cfg.train.eval_batch_size):
                logits = self.model(images.to(self.fabric.device)).cpu()
                self.metrics.update(logits, targets, loss=self.loss_fn(logits, targets).item())
        return self.metrics.compute()

    def lr(self) -> float:
        return self._lr_holder.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "core": self.core.state_dict(),
            "lr": self._lr_holder.state_dict(),
            "lr_sched": self._lr_sched.state_dict() if self._lr_sched is not None else None,
            "epsilon_history": self._epsilon_history,
            "epsilons": dict(self.server.epsilons),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["core"])
        self.spec.load_into(self.model, self.core.global_flat)
        self._lr_holder.load_state_dict(state["lr"])
        if self._lr_sched is not None and state.get("lr_sched") is not None:
            self._lr_sched.load_state_dict(state["lr_sched"])
        self._epsilon_history = state["epsilon_history"]
        self.server.epsilons.update(state.get("epsilons", {}))

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def epoch_extras(self) -> dict[str, Any]:
        return dict(self._extras)

    def result_extras(self) -> dict[str, Any]:
        core = self.core
        out = core.summary(self.server.num_sites, transport="gRPC, one process per party")
        if self.server.epsilons:
            per_site = [self.server.epsilons.get(i, math.nan) for i in range(self.server.num_sites)]
            out["privacy"] = fed_privacy_summary(
                self.cfg, per_site, self._epsilon_history,
                "opacus RDP per site, reported by the sites (sample-level DP at each hospital)",
            )
        return out
