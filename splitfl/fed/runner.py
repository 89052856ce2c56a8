"""FedAvg / FedProx rounds: sites train locally, the server aggregates what it is allowed to see.

One call of :meth:`FedRunner.train_epoch` is one federated round, so the
shared epoch loop in :mod:`splitfl.train` gives federated runs the same model
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

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from opacus.validators import ModuleValidator
from tqdm.auto import tqdm

from splitfl.config import RunConfig
from splitfl.data import DataSplits, partition_dataset
from splitfl.data.base import ArrayDataset
from splitfl.fed.aggregate import Rejection, aggregate, check_update, norm_outliers
from splitfl.fed.compress import TopKCompressor, decompress
from splitfl.fed.flat import FlatSpec
from splitfl.fed.site import Site, _seed
from splitfl.metrics import TaskMetrics, make_loss
from splitfl.models import build_split_model
from splitfl.split.tensors import tensor_from_bytes, tensor_to_bytes

SECRET_CONTEXT = "keys/consortium.secret"


def _vector_bytes(values: np.ndarray) -> bytes:
    return tensor_to_bytes(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))


def _vector_from_bytes(payload: bytes, what: str, size: int) -> np.ndarray:
    return tensor_from_bytes(payload, what, (size,)).numpy()


class FedRunner:
    """The federation: sites with their data and accountants, and a server with the global model."""

    def __init__(self, fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path) -> None:
        from splitfl.train import RunError, make_scheduler

        self.fabric, self.cfg, self.task = fabric, cfg, splits.task
        fed = cfg.fed
        self._check_config()
        model, report = build_split_model(cfg.model, splits.task.num_outputs, splits.task.n_channels, cfg.data.size)
        if report is not None:
            fabric.print(str(report))
        self.dp = fed.dp_noise_multiplier > 0 or fed.dp_target_epsilon is not None
        if self.dp and fed.norm == "batchnorm":
            raise RunError("fed.norm=batchnorm cannot be trained with DP-SGD (BatchNorm mixes samples); use fed.norm: groupnorm")
        if fed.norm == "groupnorm":  # no running statistics to average; Opacus' per-sample gradients need it too
            model = ModuleValidator.fix(model)
        if self.dp:
            errors = ModuleValidator.validate(model, strict=False)
            if errors:
                raise RunError(f"model {cfg.model.name} cannot be trained with Opacus DP-SGD: {errors[0]}")
        self.device = fabric.device
        self.model = model.to(self.device)
        self.spec = FlatSpec(self.model)
        self.global_flat = self.spec.flatten(self.model)
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
            from splitfl.he.keys import (
                consortium_secret_context,
                load_public_context,
                public_context_bytes,
            )

            # Key holders: the sites. The server gets the public context only (no secret, no evaluation keys needed).
            self.secret_ctx = consortium_secret_context(out_dir / SECRET_CONTEXT, fed.he_preset, "fed.he_preset")
            self.public_ctx = load_public_context(public_context_bytes(self.secret_ctx))
            from splitfl.he.aggregation import capacity
            from splitfl.he.keys import params_of

            # The largest |update coordinate| every site may send so that the count-weighted sum of all sites
            # cannot overflow the ciphertexts: public (from the parameters and the public sample counts).
            self.he_value_bound = capacity(params_of(self.secret_ctx)) / sum(len(s) for s in self.sites)
        self.rejections: list[Rejection] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.rounds_done = 0
        self._extras: dict[str, Any] = {}
        self._epsilon_history: list[list[float]] = []

    # ------------------------------------------------------------------ configuration

    def _check_config(self) -> None:
        from splitfl.train import RunError

        fed, n = self.cfg.fed, self.cfg.data.partition.num_sites
        if fed.local_epochs < 1:
            raise RunError(f"fed.local_epochs={fed.local_epochs} must be at least 1")
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
        n = len(self.sites)
        k = max(1, round(self.cfg.fed.client_fraction * n))
        rng = np.random.default_rng(_seed(self.cfg.seed, round_index, 7))
        return sorted(rng.choice(n, size=k, replace=False).tolist())

    def local_update(self, site: int, round_index: int, lr: float) -> tuple[np.ndarray, float]:
        """Site ``site`` trains on its own data from the global model; returns (update, loss)."""
        return self.sites[site].train(self.model, self.spec, self.global_flat, round_index, lr)

    def _reject(self, round_index: int, site: int, reason: str) -> None:
        self.rejections.append(Rejection(round_index + 1, site, reason))
        self.fabric.print(f"[{self.cfg.regime}] round {round_index + 1}: rejected site {site}: {reason}")

    def train_epoch(self, epoch: int, desc: str) -> float:
        """One federated round: broadcast, local training, upload, validation, aggregation."""
        fed = self.cfg.fed
        lr = self._lr_holder.param_groups[0]["lr"]
        chosen = self._sample_sites(epoch)
        self._he_down = self._secagg_up = self._secagg_down = 0
        round_up = 0
        losses, counts = [], []
        plain: dict[int, np.ndarray] = {}
        enc_sum = self._new_encrypted_sum() if fed.secure == "he" else None
        bar = tqdm(chosen, desc=desc, leave=False, disable=not (self.cfg.train.progress and self.fabric.is_global_zero))
        for site in bar:
            n_k = len(self.sites[site])
            update, loss = self.local_update(site, epoch, lr)
            losses.append(loss)
            counts.append(n_k)
            if fed.secure == "masks":  # the server never sees it: the site's own software screens it before masking
                problem = check_update(update, self.spec.size)
                if problem:
                    self._reject(epoch, site, f"site-side check before masking: {problem}")
                else:
                    plain[site] = update
                continue
            try:
                payload, enc = self._package(site, update, n_k)
            except (ValueError, RuntimeError) as exc:  # the site itself cannot send it (e.g. non-finite under HE)
                self._reject(epoch, site, f"could not be packaged: {exc}")
                continue
            round_up += len(payload) + (len(enc) if enc is not None else 0)
            try:
                received = self._receive(payload, site)
                if enc_sum is not None:  # checked before its ciphertexts join the sum; a refused one leaves it as it was
                    problem = check_update(received, received.shape[0])
                    if problem:
                        raise ValueError(f"plaintext part: {problem}")
                    enc_sum.add(enc)
                plain[site] = received
            except ValueError as exc:  # HEError is a ValueError too
                self._reject(epoch, site, str(exc))
        accepted = self._screen(epoch, plain) if fed.secure != "masks" else sorted(plain)
        if fed.secure == "masks":
            aggregate_update = self._masked_sum(epoch, {s: plain[s] for s in accepted})
            round_up += self._secagg_up
        elif len(accepted) >= fed.min_sites:
            aggregate_update = self._aggregate(accepted, plain, enc_sum)
        else:
            aggregate_update = None
        if aggregate_update is not None and len(accepted) >= fed.min_sites:
            self.global_flat = self.global_flat + fed.server_lr * aggregate_update
            self.spec.load_into(self.model, self.global_flat)
        else:
            self.fabric.print(
                f"[{self.cfg.regime}] round {epoch + 1}: {len(accepted)} accepted update(s) < fed.min_sites={fed.min_sites}; "
                "global model unchanged"
            )
        # Download: the new global model to every chosen site (under HE, the encrypted aggregate instead).
        down = self._he_down if self.cfg.fed.secure == "he" else len(_vector_bytes(self.global_flat))
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
        fed = self.cfg.fed
        if fed.secure == "he":
            from splitfl.he.aggregation import encrypt_update

            mask = self.he_mask
            if update.shape != mask.shape:  # the site's own software notices before encrypting
                raise ValueError(f"update has shape {update.shape}, expected {mask.shape}")
            enc = encrypt_update(self.secret_ctx, update[mask].astype(np.float64), float(n_k), value_bound=self.he_value_bound)
            return _vector_bytes(update[~mask]), enc
        if fed.secure == "none" and self.compressors is not None:
            if update.shape != (self.spec.size,):
                raise ValueError(f"update has shape {update.shape}, expected ({self.spec.size},)")
            return self.compressors[site].compress(update), None
        return _vector_bytes(update), None

    def _receive(self, payload: bytes, site: int) -> np.ndarray:
        """Server side: decode a site's plaintext payload (raises ValueError with the reason)."""
        fed = self.cfg.fed
        size = int((~self.he_mask).sum()) if fed.secure == "he" else self.spec.size
        if fed.secure == "none" and self.compressors is not None:
            return decompress(payload, size)
        try:
            return _vector_from_bytes(payload, f"site {site} update", size)
        except Exception as exc:  # ProtocolError and friends: malformed bytes
            raise ValueError(str(exc)) from exc

    def _new_encrypted_sum(self) -> Any:
        """The server's running sum of this round's encrypted updates (public context only)."""
        from splitfl.he.aggregation import EncryptedSum

        return EncryptedSum(self.public_ctx, int(self.he_mask.sum()))

    def _screen(self, round_index: int, plain: dict[int, np.ndarray]) -> list[int]:
        """Validate the plaintext parts; reject non-finite, mis-shaped and wildly scaled updates."""
        size = int((~self.he_mask).sum()) if self.cfg.fed.secure == "he" else self.spec.size
        ok: dict[int, np.ndarray] = {}
        for site, update in plain.items():
            problem = check_update(update, size)
            if problem:
                self._reject(round_index, site, problem)
            else:
                ok[site] = update
        if self.cfg.fed.secure == "none":
            norms = {s: float(np.linalg.norm(u)) for s, u in ok.items()}
            for site, reason in norm_outliers(norms, self.cfg.fed.reject_norm_factor).items():
                self._reject(round_index, site, reason)
                ok.pop(site)
        return sorted(ok)

    # ------------------------------------------------------------------ aggregation

    def _aggregate(self, accepted: list[int], plain: dict[int, np.ndarray], enc_sum: Any) -> np.ndarray:
        fed = self.cfg.fed
        weights = [float(len(self.sites[s])) for s in accepted]
        if fed.secure != "he":
            return aggregate([plain[s] for s in accepted], weights, fed.aggregator, fed.trim_ratio)
        from splitfl.he.aggregation import decrypt_aggregate

        mask = self.he_mask
        out = np.empty(self.spec.size, dtype=np.float32)
        if (~mask).any():
            out[~mask] = aggregate([plain[s] for s in accepted], weights, "mean")
        summed = enc_sum.to_bytes()  # the server's aggregate ciphertexts, sent to the key holders
        mean, total = decrypt_aggregate(self.secret_ctx, summed, int(mask.sum()))  # a key holder
        if not math.isclose(total, sum(weights)):
            raise RuntimeError(f"encrypted aggregate counts {total} samples, expected {sum(weights)}")
        out[mask] = mean
        # Sites get the encrypted sum (and the plaintext part's mean) back instead of the model.
        self._he_down = len(summed) + (len(_vector_bytes(out[~mask])) if (~mask).any() else 0)
        return out

    def _masked_sum(self, round_index: int, updates: dict[int, np.ndarray]) -> np.ndarray | None:
        """Pairwise-masked secure sum of count-weighted updates (Bonawitz et al.); the weighted mean, or None."""
        from splitfl.fed.secagg import secure_sum

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
        from splitfl.train import eval_loader

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
            "global_flat": self.global_flat,
            "model": self.model.state_dict(),
            "lr": self._lr_holder.state_dict(),
            "lr_sched": self._lr_sched.state_dict() if self._lr_sched is not None else None,
            "sites": [s.state_dict() for s in self.sites],
            "residuals": [c.residual for c in self.compressors] if self.compressors is not None else None,
            "rejections": [r.__dict__ for r in self.rejections],
            "counters": (self.bytes_up, self.bytes_down, self.rounds_done),
            "epsilon_history": self._epsilon_history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.global_flat = np.asarray(state["global_flat"], dtype=np.float32)
        self._lr_holder.load_state_dict(state["lr"])
        if self._lr_sched is not None and state.get("lr_sched") is not None:
            self._lr_sched.load_state_dict(state["lr_sched"])
        for site, s in zip(self.sites, state["sites"]):
            site.load_state_dict(s)
        if self.compressors is not None:
            for c, r in zip(self.compressors, state["residuals"]):
                c.residual = np.asarray(r, dtype=np.float32)
        self.rejections = [Rejection(**r) for r in state["rejections"]]
        self.bytes_up, self.bytes_down, self.rounds_done = state["counters"]
        self._epsilon_history = state["epsilon_history"]

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def epoch_extras(self) -> dict[str, Any]:
        return dict(self._extras)

    def result_extras(self) -> dict[str, Any]:
        fed = self.cfg.fed
        rounds = max(self.rounds_done, 1)
        out: dict[str, Any] = {
            "protocol": {
                "regime": self.cfg.regime,
                "sites": len(self.sites),
                "site_sizes": [len(s) for s in self.sites],
                "local_epochs": fed.local_epochs,
                "client_fraction": fed.client_fraction,
                "aggregator": fed.aggregator,
                "secure": fed.secure,
                "he_preset": fed.he_preset if fed.secure == "he" else None,
                "he_encrypted_fraction": float(self.he_mask.mean()) if self.he_mask is not None else None,
                "topk_fraction": fed.topk_fraction,
                "server_has_secret_key": bool(self.public_ctx.is_private()) if self.public_ctx is not None else None,
                "norm": "GroupNorm in place of BatchNorm (opacus ModuleValidator.fix)" if fed.norm == "groupnorm" else "BatchNorm",
            },
            "wire": {
                "train_bytes_up": self.bytes_up,
                "train_bytes_down": self.bytes_down,
                "bytes_per_round": (self.bytes_up + self.bytes_down) / rounds,
                "bytes_up_per_round": self.bytes_up / rounds,
                "bytes_down_per_round": self.bytes_down / rounds,
            },
            "rejections": [r.__dict__ for r in self.rejections],
        }
        if self.dp:
            per_site = [s.epsilon() for s in self.sites]
            out["privacy"] = {
                "epsilon": max(per_site),
                "epsilon_per_site": per_site,
                "epsilon_per_round": self._epsilon_history,
                "delta": fed.dp_delta,
                "noise_multiplier_per_site": [s.noise_multiplier for s in self.sites],
                "max_grad_norm": fed.dp_max_grad_norm,
                "target_epsilon": fed.dp_target_epsilon,
                "accountant": "opacus RDP per site, DP-SGD with Poisson sampling (sample-level DP at each hospital)",
            }
        return out
