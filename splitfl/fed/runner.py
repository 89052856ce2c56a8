"""FedAvg / FedProx rounds: sites train locally, the server aggregates what it is allowed to see.

One call of :meth:`FedRunner.train_epoch` is one federated round, so the
shared epoch loop in :mod:`splitfl.engine` gives federated runs the same model
selection, atomic checkpoints and resume as every other regime
(``train.epochs`` is the number of rounds).

What crosses the wire, per ``fed.secure``:

* ``none``: each site's update as float32 bytes (or top-k indices and values);
  the server validates and aggregates it in plaintext.
* ``he``: the update (or the layers in ``fed.he_layers``), times the site's
  sample count, as CKKS ciphertexts under the consortium key; the server adds
  ciphertexts with a public context and never holds a secret key; a key holder
  decrypts only the sum.
* ``masks``: pairwise-masked fixed-point updates (Bonawitz et al.); the server
  learns only the sum.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from tqdm.auto import tqdm

from splitfl.artifacts import write_bytes
from splitfl.config import RunConfig
from splitfl.data import DataSplits, partition_dataset
from splitfl.data.base import ArrayDataset
from splitfl.engine import RunError, eval_loader, fit, make_scheduler
from splitfl.fed.aggregate import check_update
from splitfl.fed.compress import TopKCompressor
from splitfl.fed.flat import FlatSpec
from splitfl.fed.secagg import secure_sum
from splitfl.fed.server import FedServerCore, build_fed_model, fed_privacy_summary, vector_bytes, vector_from_bytes
from splitfl.fed.site import Site, package_update
from splitfl.he.aggregation import decrypt_aggregate
from splitfl.he.keys import consortium_secret_context, load_public_context, public_context_bytes
from splitfl.metrics import TaskMetrics, make_loss
from splitfl.plots import plot_learning_curves
from splitfl.transcript import TranscriptRecorder

SECRET_CONTEXT = "keys/consortium.secret"


_vector_bytes = vector_bytes  # the old private names
_vector_from_bytes = vector_from_bytes


def fed_transcript(cfg: RunConfig, out_dir: Path, spec: FlatSpec, site_sizes: list[int]) -> Any:
    """The recorder of the server's view of a federated run (``<out>/transcript``), with what an attacker knows."""

    meta = {
        "regime": cfg.regime,
        "view": "federation server",
        "config": dataclasses.asdict(cfg),
        "site_sizes": site_sizes,
        "parameters": [[e.name, list(e.shape), e.offset] for e in spec.entries],
        "kinds": {
            "round_info": "JSON: the round's sampled sites and the learning rate the server broadcast",
            "global_model": "the global model broadcast at the round's start (float32 SFT1 vector)",
            "site{k}_update": "site k's upload: its update (plaintext part under fed.secure he) as the server got it",
            "site{k}_update_enc": "fed.secure he: site k's CKKS ciphertexts (count x update of the encrypted layers)",
        },
    }
    return TranscriptRecorder(Path(out_dir) / "transcript", cfg.fed.transcript_max_rounds, meta)


def record_ground_truth(folder: Path, round_index: int, site: int, batches: list[list[int]]) -> None:
    """The hospital's evaluation key: which of its images each step of the round used (never sent anywhere)."""

    with open(Path(folder) / "ground_truth.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"round": round_index, "site": site, "batches": batches}) + "\n")


class FedRunner:
    """The federation: sites with their data and accountants, and a server with the global model."""

    def __init__(self, fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path) -> None:
        self.fabric, self.cfg, self.task = fabric, cfg, splits.task
        fed = cfg.fed
        self._check_config()
        model = build_fed_model(cfg, splits.task.num_outputs, splits.task.n_channels, fabric.print)
        self.dp = fed.dp_noise_multiplier > 0 or fed.dp_target_epsilon is not None
        self.device = fabric.device
        self.model = model.to(self.device)
        self.spec = FlatSpec(self.model)
        self.loss_fn = make_loss(splits.task)
        self.metrics = TaskMetrics(splits.task, device="cpu")
        self.train_set = splits.train
        self.sites = [
            Site(i, ds, cfg, self.loss_fn, self.device) for i, ds in enumerate(partition_dataset(splits.train, cfg.data.partition))
        ]
        # The clients' learning-rate schedule over rounds (the server broadcasts the round's rate).
        self._lr_holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
        self._lr_sched = make_scheduler(self._lr_holder, cfg.train)
        self.compressors = (
            [TopKCompressor(self.spec.size, fed.topk_fraction) for _ in self.sites] if fed.topk_fraction > 0 else None
        )
        try:
            self.he_mask = self.spec.select(fed.he_layers) if fed.secure == "he" else None
        except ValueError as exc:
            raise RunError(str(exc)) from None
        self.secret_ctx = self.public_ctx = None
        if fed.secure == "he":
            # Key holders: the sites. The server gets the public context only (no secret, no evaluation keys needed).
            self.secret_ctx = consortium_secret_context(out_dir / SECRET_CONTEXT, fed.he_preset, "fed.he_preset")
            self.public_ctx = load_public_context(public_context_bytes(self.secret_ctx))
        # The server: global model, validation, aggregation, books (shared with the gRPC server).
        self.core = FedServerCore(
            cfg,
            self.spec.size,
            self.spec.flatten(self.model),
            [len(s) for s in self.sites],
            he_mask=self.he_mask,
            public_ctx=self.public_ctx,
            log=fabric.print,
        )
        if fed.transcript:
            self.core.recorder = fed_transcript(cfg, out_dir, self.spec, [len(s) for s in self.sites])
            if self.public_ctx is not None:  # the server holds the public context: the attack may use it

                write_bytes(self.core.recorder.folder / "server_public_context.bin", public_context_bytes(self.secret_ctx), 0o644)
        if fed.secure == "he":
            # The largest |update coordinate| every site may send so that the count-weighted sum of all sites
            # cannot overflow the ciphertexts: public (from the parameters and the public sample counts).
            self.he_value_bound = self.core.he_value_bound()
        self._extras: dict[str, Any] = {}
        self._epsilon_history: list[list[float]] = []

    # The server's state, kept in the core (attributes for the tests and the old call sites).
    global_flat = property(lambda self: self.core.global_flat, lambda self, v: setattr(self.core, "global_flat", v))
    rejections = property(lambda self: self.core.rejections, lambda self, v: setattr(self.core, "rejections", v))
    bytes_up = property(lambda self: self.core.bytes_up, lambda self, v: setattr(self.core, "bytes_up", v))
    bytes_down = property(lambda self: self.core.bytes_down, lambda self, v: setattr(self.core, "bytes_down", v))
    rounds_done = property(lambda self: self.core.rounds_done, lambda self, v: setattr(self.core, "rounds_done", v))

    # ------------------------------------------------------------------ configuration

    def _check_config(self) -> None:
        fed, n = self.cfg.fed, self.cfg.data.partition.num_sites
        if fed.local_epochs < 1:
            raise RunError(f"fed.local_epochs={fed.local_epochs} must be at least 1")
        if fed.local_steps is not None and fed.local_steps < 1:
            raise RunError(f"fed.local_steps={fed.local_steps} must be at least 1 (or null for whole local epochs)")
        if not 0 < fed.client_fraction <= 1:
            raise RunError(f"fed.client_fraction={fed.client_fraction} must be in (0, 1]")
        if not 1 <= fed.min_sites <= n:
            raise RunError(f"fed.min_sites={fed.min_sites} must be between 1 and the number of sites ({n})")
        if fed.secure != "none" and fed.aggregator != "mean":
            raise RunError(
                f"fed.aggregator={fed.aggregator!r} needs each update in plaintext; with fed.secure={fed.secure!r} "
                "the server only ever holds the sum, so use fed.aggregator: mean"
            )
        if fed.secure != "none" and fed.topk_fraction > 0:
            raise RunError(
                f"fed.topk_fraction needs plaintext aggregation: sites' top-k coordinates differ, so they cannot be "
                f"summed under fed.secure={fed.secure!r}; set fed.topk_fraction: 0"
            )
        if fed.he_layers and fed.secure != "he":
            raise RunError("fed.he_layers chooses what to encrypt and needs fed.secure: he")
        if fed.dp_noise_multiplier > 0 and fed.dp_target_epsilon is not None:
            raise RunError("give fed.dp_noise_multiplier or fed.dp_target_epsilon, not both")
        if fed.dp_target_epsilon is not None and fed.dp_target_epsilon <= 0:
            raise RunError(f"fed.dp_target_epsilon={fed.dp_target_epsilon} must be positive")
        if (fed.dp_noise_multiplier > 0 or fed.dp_target_epsilon is not None) and fed.dp_max_grad_norm <= 0:
            raise RunError("DP-SGD needs fed.dp_max_grad_norm > 0 (the per-sample clipping bound)")
        if fed.mu < 0 or fed.server_lr <= 0:
            raise RunError(f"fed.mu={fed.mu} must be >= 0 and fed.server_lr={fed.server_lr} > 0")

    # ------------------------------------------------------------------ one round

    def _sample_sites(self, round_index: int) -> list[int]:
        return self.core.sample_sites(round_index)

    def local_update(self, site: int, round_index: int, lr: float) -> tuple[np.ndarray, float]:
        """Site ``site`` trains on its own data from the global model; returns (update, loss)."""
        return self.sites[site].train(self.model, self.spec, self.global_flat, round_index, lr)

    def _reject(self, round_index: int, site: int, reason: str) -> None:
        self.core.reject(round_index, site, reason)

    def train_epoch(self, epoch: int, desc: str) -> float:
        """One federated round: broadcast, local training, upload, validation, aggregation."""
        fed = self.cfg.fed
        core = self.core
        lr = self._lr_holder.param_groups[0]["lr"]
        chosen = self._sample_sites(epoch)
        self._he_down = self._secagg_up = self._secagg_down = 0
        round_up = 0
        losses, counts = [], []
        acc = core.begin_round(epoch, chosen, lr=lr)
        bar = tqdm(chosen, desc=desc, leave=False, disable=not (self.cfg.train.progress and self.fabric.is_global_zero))
        recording = core.recorder is not None and core.recorder.active
        for site in bar:
            n_k = len(self.sites[site])
            update, loss = self.local_update(site, epoch, lr)
            if recording:
                record_ground_truth(core.recorder.folder, epoch, site, self.sites[site].last_batches)
            losses.append(loss)
            counts.append(n_k)
            if fed.secure == "masks":  # the server never sees it: the site's own software screens it before masking
                problem = check_update(update, self.spec.size)
                if problem:
                    self._reject(epoch, site, f"site-side check before masking: {problem}")
                else:
                    acc.plain[site] = update
                continue
            try:
                payload, enc = self._package(site, update, n_k)
            except (ValueError, RuntimeError) as exc:  # the site itself cannot send it (e.g. non-finite under HE)
                self._reject(epoch, site, f"could not be packaged: {exc}")
                continue
            round_up += len(payload) + (len(enc) if enc is not None else 0)
            try:
                core.receive(acc, site, payload, enc)
            except ValueError as exc:  # HEError is a ValueError too
                self._reject(epoch, site, str(exc))
        accepted = core.screen(acc) if fed.secure != "masks" else sorted(acc.plain)
        if fed.secure == "masks":
            aggregate_update = self._masked_sum(epoch, {s: acc.plain[s] for s in accepted})
            round_up += self._secagg_up
        elif len(accepted) >= fed.min_sites:
            aggregate_update = self._aggregate(accepted, acc)
        else:
            aggregate_update = None
        if core.apply(aggregate_update, accepted):
            self.spec.load_into(self.model, self.global_flat)
        # Download: the new global model to every chosen site (under HE, the encrypted aggregate instead).
        down = self._he_down if self.cfg.fed.secure == "he" else len(vector_bytes(self.global_flat))
        self.bytes_down += down * len(chosen) + self._secagg_down
        self.bytes_up += round_up
        if self._lr_sched is not None:
            self._lr_holder.step()  # a no-op (no gradients) that keeps the scheduler's step-order check quiet
            self._lr_sched.step()
        self.rounds_done += 1
        eps = [s.epsilon() for s in self.sites] if self.dp else []
        self._epsilon_history.append(eps)
        self._extras = {
            "sites": len(chosen),
            "accepted": len(accepted),
            "bytes_up": round_up,
            "bytes_down": down * len(chosen),
        }
        if self.dp:
            self._extras["epsilon_max"] = max(eps)
        return float(np.average(losses, weights=counts)) if losses else math.nan

    # ------------------------------------------------------------------ wire

    def _package(self, site: int, update: np.ndarray, n_k: int) -> tuple[bytes, bytes | None]:
        """What the site uploads: (plaintext part, encrypted part or None)."""
        return package_update(
            self.cfg,
            update,
            n_k,
            size=self.spec.size,
            he_mask=self.he_mask,
            secret_ctx=self.secret_ctx,
            value_bound=getattr(self, "he_value_bound", None),
            compressor=self.compressors[site] if self.compressors is not None else None,
        )

    def _receive(self, payload: bytes, site: int) -> np.ndarray:
        """Server side: decode a site's plaintext payload (raises ValueError with the reason)."""
        return self.core.decode(payload, site)

    # ------------------------------------------------------------------ aggregation

    def _aggregate(self, accepted: list[int], acc: Any) -> np.ndarray:
        out, summed = self.core.aggregate(acc, accepted)
        if summed is None:
            return out

        mask = self.he_mask
        mean, total = decrypt_aggregate(self.secret_ctx, summed, int(mask.sum()))  # a key holder
        out = self.core.complete_he(acc, accepted, out, mean, total)
        # Sites get the encrypted sum (and the plaintext part's mean) back instead of the model.
        self._he_down = len(summed) + (len(vector_bytes(out[~mask])) if (~mask).any() else 0)
        return out

    def _masked_sum(self, round_index: int, updates: dict[int, np.ndarray]) -> np.ndarray | None:
        """Pairwise-masked secure sum of count-weighted updates (Bonawitz et al.); the weighted mean, or None."""

        fed = self.cfg.fed
        if len(updates) < max(fed.min_sites, 2):  # a "sum" of one site would be that site's update
            return None
        counts = {s: float(len(self.sites[s])) for s in updates}
        threshold = min(fed.secagg_threshold or (len(updates) // 2 + 1), len(updates))
        result = secure_sum({s: counts[s] * u for s, u in updates.items()}, threshold=threshold, round_id=round_index)
        self._secagg_up, self._secagg_down = result.bytes_up, result.bytes_down
        return (result.total / sum(counts.values())).astype(np.float32)

    # ------------------------------------------------------------------ the fit() protocol

    def evaluate(self, dataset: ArrayDataset) -> dict[str, Any]:
        self.model.eval()
        self.metrics.reset()
        with torch.no_grad():
            for images, targets in eval_loader(dataset, self.cfg.train.eval_batch_size):
                logits = self.model(images.to(self.device)).cpu()
                self.metrics.update(logits, targets, loss=self.loss_fn(logits, targets).item())
        return self.metrics.compute()

    def lr(self) -> float:
        return self._lr_holder.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.core.state_dict(),  # global model, rejections, counters, site sizes
            "model": self.model.state_dict(),
            "lr": self._lr_holder.state_dict(),
            "lr_sched": self._lr_sched.state_dict() if self._lr_sched is not None else None,
            "sites": [s.state_dict() for s in self.sites],
            "residuals": [c.residual for c in self.compressors] if self.compressors is not None else None,
            "epsilon_history": self._epsilon_history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.core.load_state_dict(state)
        self._lr_holder.load_state_dict(state["lr"])
        if self._lr_sched is not None and state.get("lr_sched") is not None:
            self._lr_sched.load_state_dict(state["lr_sched"])
        for site, s in zip(self.sites, state["sites"]):
            site.load_state_dict(s)
        if self.compressors is not None:
            for c, r in zip(self.compressors, state["residuals"]):
                c.residual = np.asarray(r, dtype=np.float32)
        self._epsilon_history = state["epsilon_history"]

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def epoch_extras(self) -> dict[str, Any]:
        return dict(self._extras)

    def result_extras(self) -> dict[str, Any]:
        out = self.core.summary(len(self.sites))
        if self.dp:
            out["privacy"] = fed_privacy_summary(
                self.cfg, [s.epsilon() for s in self.sites], self._epsilon_history,
                "opacus RDP per site, DP-SGD with Poisson sampling (sample-level DP at each hospital)",
                noise_multipliers=[s.noise_multiplier for s in self.sites],
            )
        return out


def run_fed(fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path) -> dict[str, Any]:
    """fedavg / fedprox: sites train full models locally; the server averages their updates each round."""
    fabric.seed_everything(cfg.seed, verbose=False)
    runner = FedRunner(fabric, cfg, splits, out_dir)
    result = fit(fabric, runner, cfg, splits, out_dir, cfg.regime)
    plot_learning_curves({cfg.regime: result["history"]}, out_dir / "learning_curves.png", f"{cfg.regime}: {splits.task.name}")
    return {k: v for k, v in result.items() if k != "history"}
