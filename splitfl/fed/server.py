"""The federation server's logic, shared by the in-process runner and the gRPC server.

:class:`FedServerCore` holds what the coordinating server holds and nothing
else: the global model as a flat float32 vector, the sites' public sample
counts, under ``fed.secure: he`` the consortium's *public* CKKS context, and
its own bookkeeping (rejections, bytes on the wire, rounds done). One round is

1. :meth:`FedServerCore.sample_sites` (deterministic in the seed and round),
2. :meth:`begin_round`, then :meth:`receive` for every upload that arrives
   (decoded and checked on receipt; a CKKS part joins the round's
   :class:`~splitfl.he.aggregation.EncryptedSum`),
3. :meth:`screen` (non-finite / mis-shaped / norm-outlier updates rejected),
4. :meth:`aggregate` (plaintext mean or robust rule; under HE the plaintext
   part's mean and the encrypted sum for a key holder to decrypt),
5. :meth:`apply` (the server step on the global vector).

:class:`splitfl.fed.runner.FedRunner` drives it with in-process sites (the
unit-test path); :mod:`splitfl.net.fed` drives it from gRPC handlers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from opacus.validators import ModuleValidator

from splitfl.config import RunConfig
from splitfl.engine import RunError
from splitfl.fed.aggregate import Rejection, aggregate, check_update, norm_outliers
from splitfl.fed.compress import decompress
from splitfl.fed.site import _seed
from splitfl.he.aggregation import EncryptedSum, capacity
from splitfl.he.keys import params_of
from splitfl.models import build_split_model
from splitfl.tensors import tensor_from_bytes, tensor_to_bytes

__all__ = ["FedServerCore", "RoundAcc", "build_fed_model", "fed_privacy_summary", "sample_sites", "vector_bytes", "vector_from_bytes"]


def vector_bytes(values: np.ndarray) -> bytes:
    """A float32 vector as SFT1 bytes (the wire format of models and plaintext updates)."""
    return tensor_to_bytes(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))


def vector_from_bytes(payload: bytes, what: str, size: int) -> np.ndarray:
    return tensor_from_bytes(payload, what, (size,)).numpy()


def sample_sites(cfg: RunConfig, round_index: int) -> list[int]:
    """The sites sampled in ``round_index`` (fed.client_fraction; the same on every party and on resume)."""
    n = cfg.data.partition.num_sites
    k = max(1, round(cfg.fed.client_fraction * n))
    rng = np.random.default_rng(_seed(cfg.seed, round_index, 7))
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def build_fed_model(cfg: RunConfig, num_outputs: int, n_channels: int, log: Callable[[str], Any] | None = None) -> torch.nn.Module:
    """The federation's model, as every party builds it (GroupNorm in place of BatchNorm under fed.norm: groupnorm)."""

    model, report = build_split_model(cfg.model, num_outputs, n_channels, cfg.data.size)
    if report is not None and log is not None:
        log(str(report))
    fed = cfg.fed
    dp = fed.dp_noise_multiplier > 0 or fed.dp_target_epsilon is not None
    if cfg.model.freeze_encoder:
        # A frozen encoder (a foundation model's embeddings) is used as loaded: replacing its BatchNorm would
        # discard its weights, and its running statistics never change, so fed.norm only concerns trained layers.
        trained: torch.nn.Module = model.head
    else:
        if dp and fed.norm == "batchnorm":
            raise RunError("fed.norm=batchnorm cannot be trained with DP-SGD (BatchNorm mixes samples); use fed.norm: groupnorm")
        if fed.norm == "groupnorm":  # no running statistics to average; Opacus' per-sample gradients need it too
            model = ModuleValidator.fix(model)
        trained = model
    if dp:
        errors = ModuleValidator.validate(trained, strict=False)
        if errors:
            raise RunError(f"model {cfg.model.name} cannot be trained with Opacus DP-SGD: {errors[0]}")
    return model


def fed_privacy_summary(cfg: RunConfig, per_site: list[float], history: list[list[float]], accountant: str,
                        noise_multipliers: list[float] | None = None) -> dict[str, Any]:
    """metrics.json's ``privacy`` section of a DP FedAvg run (in-process, or from the epsilons sites reported).

    A site that never reported is NaN in ``per_site`` and left out of the maximum.
    """
    fed = cfg.fed
    out: dict[str, Any] = {
        "epsilon": float(np.nanmax(per_site)),
        "epsilon_per_site": per_site,
        "epsilon_per_round": history,
        "delta": fed.dp_delta,
    }
    if noise_multipliers is not None:
        out["noise_multiplier_per_site"] = noise_multipliers
    out.update({"max_grad_norm": fed.dp_max_grad_norm, "target_epsilon": fed.dp_target_epsilon, "accountant": accountant})
    return out


@dataclass
class RoundAcc:
    """What the server has received in one round so far."""

    round_index: int
    chosen: list[int]
    plain: dict[int, np.ndarray] = field(default_factory=dict)
    enc_sum: Any = None
    losses: dict[int, float] = field(default_factory=dict)
    epsilons: dict[int, float] = field(default_factory=dict)
    bytes_up: int = 0


class FedServerCore:
    """The server side of FedAvg / FedProx: validation, aggregation, the global model and the books."""

    def __init__(
        self,
        cfg: RunConfig,
        size: int,
        global_flat: np.ndarray,
        site_sizes: list[int] | None,
        *,
        he_mask: np.ndarray | None = None,
        public_ctx: Any = None,
        log: Callable[[str], Any] = print,
    ) -> None:
        self.cfg, self.size, self.log = cfg, size, log
        self.global_flat = np.asarray(global_flat, dtype=np.float32)
        self.site_sizes = list(site_sizes) if site_sizes is not None else None
        self.he_mask, self.public_ctx = he_mask, public_ctx
        if cfg.fed.secure == "he" and (he_mask is None or public_ctx is None):
            raise ValueError("fed.secure: he needs the encrypted-coordinate mask and the consortium's public context")
        if public_ctx is not None and public_ctx.is_private():
            raise ValueError("the server must hold the PUBLIC context only (this one can decrypt)")
        self.rejections: list[Rejection] = []
        self.recorder: Any = None  # a TranscriptRecorder under fed.transcript: the server's view, one step per round
        self.bytes_up = 0
        self.bytes_down = 0
        self.rounds_done = 0

    # ------------------------------------------------------------------ facts

    def summary(self, num_sites: int, transport: str = "in-process") -> dict[str, Any]:
        """The protocol facts, traffic and rejections that metrics.json reports for a federated run."""
        fed = self.cfg.fed
        rounds = max(self.rounds_done, 1)
        return {
            "protocol": {
                "regime": self.cfg.regime,
                "transport": transport,
                "sites": num_sites,
                "site_sizes": list(self.site_sizes) if self.site_sizes is not None else None,
                "local_epochs": fed.local_epochs,
                "local_steps": fed.local_steps,
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

    @property
    def secure(self) -> str:
        return self.cfg.fed.secure

    @property
    def plain_size(self) -> int:
        """Length of the plaintext part of an update (everything but the encrypted coordinates)."""
        return int((~self.he_mask).sum()) if self.secure == "he" else self.size

    @property
    def encrypted_size(self) -> int:
        return int(self.he_mask.sum()) if self.secure == "he" else 0

    def he_value_bound(self) -> float:
        """The largest |coordinate| each site may encrypt: capacity / sum of all sites' counts (public)."""

        if self.public_ctx is None or not self.site_sizes:
            return 0.0
        return capacity(params_of(self.public_ctx)) / sum(self.site_sizes)

    def site_count(self, site: int) -> float:
        assert self.site_sizes is not None
        return float(self.site_sizes[site])

    def sample_sites(self, round_index: int) -> list[int]:
        return sample_sites(self.cfg, round_index)

    # ------------------------------------------------------------------ one round

    def begin_round(self, round_index: int, chosen: list[int], lr: float | None = None) -> RoundAcc:
        acc = RoundAcc(round_index, list(chosen))
        if self.recorder is not None:  # what the server sends: the round's instructions and the global model

            info = {"round": round_index, "chosen": list(chosen), "lr": lr}
            self.recorder.record("round_info", json.dumps(info).encode())
            self.recorder.record("global_model", vector_bytes(self.global_flat))
        if self.secure == "he":
            acc.enc_sum = EncryptedSum(self.public_ctx, self.encrypted_size)
        return acc

    def reject(self, round_index: int, site: int, reason: str) -> None:
        self.rejections.append(Rejection(round_index + 1, site, reason))
        self.log(f"[{self.cfg.regime}] round {round_index + 1}: rejected site {site}: {reason}")

    def decode(self, payload: bytes, site: int) -> np.ndarray:
        """A site's plaintext payload as a vector (raises ValueError with the reason)."""
        if self.secure == "none" and self.cfg.fed.topk_fraction > 0:
            return decompress(payload, self.plain_size)
        try:
            return vector_from_bytes(payload, f"site {site} update", self.plain_size)
        except Exception as exc:  # ProtocolError and friends: malformed bytes
            raise ValueError(str(exc)) from exc

    def receive(self, acc: RoundAcc, site: int, payload: bytes, enc: bytes | None) -> np.ndarray:
        """Take one site's upload into the round, or raise ValueError (the round's state unchanged)."""
        if self.recorder is not None:  # what arrived, whether or not it is then accepted
            self.recorder.record(f"site{site}_update", payload)
            if enc is not None:
                self.recorder.record(f"site{site}_update_enc", enc)
        received = self.decode(payload, site)
        if self.secure == "he":  # checked before its ciphertexts join the sum; a refused one leaves it as it was
            problem = check_update(received, received.shape[0])
            if problem:
                raise ValueError(f"plaintext part: {problem}")
            if enc is None:
                raise ValueError("fed.secure: he needs the encrypted part of the update")
            info = acc.enc_sum.add(enc)
            if self.site_sizes is not None and not math.isclose(info.count, self.site_count(site)):
                raise ValueError(f"the encrypted part declares {info.count} samples, the site joined with {self.site_count(site)}")
        acc.plain[site] = received
        return received

    def screen(self, acc: RoundAcc) -> list[int]:
        """Validate the plaintext parts; reject non-finite, mis-shaped and wildly scaled updates."""
        ok: dict[int, np.ndarray] = {}
        for site, update in acc.plain.items():
            problem = check_update(update, self.plain_size)
            if problem:
                self.reject(acc.round_index, site, problem)
            else:
                ok[site] = update
        if self.secure == "none":
            norms = {s: float(np.linalg.norm(u)) for s, u in ok.items()}
            for site, reason in norm_outliers(norms, self.cfg.fed.reject_norm_factor).items():
                self.reject(acc.round_index, site, reason)
                ok.pop(site)
        return sorted(ok)

    def aggregate(self, acc: RoundAcc, accepted: list[int]) -> tuple[np.ndarray, bytes | None]:
        """(the aggregate update, None) in plaintext; under HE (the update with only the plaintext part filled,
        the encrypted sum for a key holder to decrypt; its mean goes into :meth:`complete_he`)."""
        fed = self.cfg.fed
        weights = [self.site_count(s) for s in accepted]
        if self.secure != "he":
            return aggregate([acc.plain[s] for s in accepted], weights, fed.aggregator, fed.trim_ratio), None
        mask = self.he_mask
        out = np.empty(self.size, dtype=np.float32)
        if (~mask).any():
            out[~mask] = aggregate([acc.plain[s] for s in accepted], weights, "mean")
        if len(accepted) != acc.enc_sum.n_sites:  # screening dropped a site whose ciphertexts are in the sum
            raise RuntimeError(
                f"the encrypted sum holds {acc.enc_sum.n_sites} updates but {len(accepted)} were accepted"
            )
        return out, acc.enc_sum.to_bytes()

    def complete_he(self, acc: RoundAcc, accepted: list[int], partial: np.ndarray, mean: np.ndarray, total: float) -> np.ndarray:
        """Put a key holder's decrypted mean into the aggregate; checks it is the mean of the accepted sites."""
        expected = sum(self.site_count(s) for s in accepted)
        if not math.isclose(total, expected):
            raise RuntimeError(f"encrypted aggregate counts {total} samples, expected {expected}")
        mean = np.asarray(mean)
        if mean.shape != (self.encrypted_size,) or not np.all(np.isfinite(mean)):
            raise ValueError(f"decrypted mean has shape {mean.shape} (expected ({self.encrypted_size},)) or non-finite values")
        out = partial.copy()
        out[self.he_mask] = mean
        return out

    def apply(self, update: np.ndarray | None, accepted: list[int]) -> bool:
        """The server step; False (model unchanged, logged) below fed.min_sites."""
        fed = self.cfg.fed
        if self.recorder is not None:
            self.recorder.next_step()
        if update is not None and len(accepted) >= fed.min_sites:
            self.global_flat = self.global_flat + fed.server_lr * update
            return True
        self.log(
            f"[{self.cfg.regime}] round {self.rounds_done + 1}: {len(accepted)} accepted update(s) < fed.min_sites={fed.min_sites}; "
            "global model unchanged"
        )
        return False

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_flat": self.global_flat,
            "rejections": [r.__dict__ for r in self.rejections],
            "counters": (self.bytes_up, self.bytes_down, self.rounds_done),
            "site_sizes": self.site_sizes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_flat = np.asarray(state["global_flat"], dtype=np.float32)
        self.rejections = [Rejection(**r) for r in state["rejections"]]
        self.bytes_up, self.bytes_down, self.rounds_done = state["counters"]
        if state.get("site_sizes") is not None:
            self.site_sizes = list(state["site_sizes"])
