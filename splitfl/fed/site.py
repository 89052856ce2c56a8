"""One hospital in federated averaging: local training on its own images, optionally with DP-SGD.

A site receives the global model, trains a copy for ``fed.local_epochs`` and
returns its update (new minus global weights). With differential privacy the
local training is Opacus DP-SGD (per-sample clipping, Gaussian noise, Poisson
sampling) and the site's RDP accountant persists across rounds, so the epsilon
it reports is what all its rounds together have spent. With ``fed.model_guard``
a site first checks the model it received against the one it accepted the
round before and refuses to train on one a server has changed out of line.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, Dataset

from splitfl.config import RunConfig
from splitfl.data.base import ArrayDataset
from splitfl.engine import RunError, make_optimizer
from splitfl.fed.flat import FlatSpec
from splitfl.he.aggregation import encrypt_update
from splitfl.models.embeddings import embedded_dataset
from splitfl.tensors import tensor_to_bytes


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (site, round, ...), stable across runs and resumes."""
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value * 6364136223846793005 + p + 1442695040888963407) % (1 << 63)
    return value


# fed.model_guard: a tensor that was (near) zero may still move by this RMS per coordinate times the bound.
GUARD_FLOOR_RMS = 0.01


class ModelGuardError(RunError):
    """A hospital refused the global model it received (``fed.model_guard``): out of line with the previous round's."""


def model_change_problem(previous: dict[str, torch.Tensor], current: dict[str, torch.Tensor], bound: float) -> str | None:
    """Why ``current`` (a state dict) is out of line with ``previous``, or None.

    Names and shapes must be the same; every floating tensor may move by at most
    ``bound`` x max(||previous||, GUARD_FLOOR_RMS x sqrt(size)) in L2 norm. Honest
    FedAvg moves a tensor by a small step per round; a server that swaps in crafted
    weights (an imprint block switched on, a trap layer) moves some by about their
    whole norm. The floor lets zero-initialised tensors start training.
    """
    if list(previous) != list(current):
        gone, new = sorted(set(previous) - set(current)), sorted(set(current) - set(previous))
        return f"its parameter names changed (missing {gone[:3]}, new {new[:3]})" if gone or new else \
            "its parameters come in another order"
    for name, now in current.items():
        before = previous[name]
        if now.shape != before.shape:
            return f"{name} has shape {tuple(now.shape)}, was {tuple(before.shape)}"
        if not now.is_floating_point():
            continue
        moved = float((now.double() - before.double()).norm())
        allowed = bound * max(float(before.double().norm()), GUARD_FLOOR_RMS * math.sqrt(max(before.numel(), 1)))
        if not moved <= allowed:  # NaN refuses too
            return f"{name} moved by {moved:.4g} in L2 norm, more than {allowed:.4g} ({bound:g} x its previous norm or the floor)"
    return None


class _Indexed(Dataset):
    """(image, target, index): lets a site log which of its images each step used (for attack evaluation)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, target = self.dataset[index]
        return image, target, index


class Site:
    """A hospital's local trainer; holds its data, its DP accountant and nothing else between rounds."""

    def __init__(self, index: int, dataset: ArrayDataset, cfg: RunConfig, loss_fn: nn.Module, device: torch.device) -> None:
        self.index, self.dataset, self.cfg, self.loss_fn, self.device = index, dataset, cfg, loss_fn, device
        fed = cfg.fed
        self.dp = fed.dp_noise_multiplier > 0 or fed.dp_target_epsilon is not None
        self.accountant: RDPAccountant | None = RDPAccountant() if self.dp else None
        self.noise_multiplier = fed.dp_noise_multiplier
        self.last_batches: list[list[int]] = []  # indices (into this site's data) of each step of the last round
        self._embedded: Dataset | None = None  # frozen encoder: this site's embeddings, computed once
        self._guard_ref: dict[str, torch.Tensor] | None = None  # fed.model_guard: the last global model accepted
        if fed.model_guard is not None and not fed.model_guard > 0:
            raise RunError(f"fed.model_guard={fed.model_guard} must be > 0 (or null: off)")
        if self.dp and fed.dp_target_epsilon is not None:
            # Noise for the whole run, assuming the site takes part in every round (conservative when sampled).
            steps = cfg.train.epochs * self.steps_per_round
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=fed.dp_target_epsilon,
                target_delta=fed.dp_delta,
                sample_rate=self.sample_rate,
                steps=steps,
                accountant="rdp",
            )

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.dataset) / self.cfg.train.batch_size))

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per round: fed.local_epochs epochs, capped at fed.local_steps."""
        steps = self.cfg.fed.local_epochs * self.batches_per_epoch
        return steps if self.cfg.fed.local_steps is None else min(steps, self.cfg.fed.local_steps)

    @property
    def sample_rate(self) -> float:
        """Poisson sampling rate, as Opacus derives it from the loader (1 / batches per epoch)."""
        return 1.0 / self.batches_per_epoch

    def epsilon(self) -> float:
        """Epsilon spent so far at fed.dp_delta (0 before the first DP step; inf without DP)."""
        if self.accountant is None:
            return math.inf
        return self.accountant.get_epsilon(self.cfg.fed.dp_delta) if len(self.accountant) else 0.0

    def train(self, global_model: nn.Module, spec: FlatSpec, global_flat: np.ndarray, round_index: int, lr: float) -> tuple[np.ndarray, float]:
        """Train a copy of the global model locally; return (update, mean training loss).

        Raises ModelGuardError (nothing trained, nothing sent) when ``fed.model_guard`` is set and the
        received model is out of line with the one received before.
        """
        if self.cfg.fed.model_guard is not None:
            self._check_received(global_model, round_index)
        whole = copy.deepcopy(global_model).to(self.device)
        whole.train()
        # A frozen encoder never changes: the site embeds its images once and trains only the head on them.
        frozen = getattr(whole, "encoder_frozen", False)
        if frozen and self._embedded is None:
            self._embedded = embedded_dataset(whole.encoder, self.dataset, self.cfg.train.eval_batch_size, self.device)
        local: nn.Module = whole.head if frozen else whole
        model: nn.Module = local  # under DP, Opacus' wrapper around the same parameters
        trainable = [p for p in local.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable, dataclasses.replace(self.cfg.train, lr=lr))
        generator = torch.Generator().manual_seed(_seed(self.cfg.seed, self.index, round_index))
        data = self._embedded if frozen else self.dataset
        loader = DataLoader(_Indexed(data), batch_size=self.cfg.train.batch_size, shuffle=True, generator=generator)
        if self.dp:
            engine = PrivacyEngine(accountant="rdp")
            engine.accountant = self.accountant  # one accountant per site, across rounds
            model, optimizer, loader = engine.make_private(
                module=local,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.cfg.fed.dp_max_grad_norm,
                poisson_sampling=True,
                noise_generator=torch.Generator(device=self.device).manual_seed(_seed(self.cfg.seed, self.index, round_index, 1)),
                # Per-sample gradients through torch's ExpandedWeights: hook-based modes break on residual blocks
                # that add in place to a normalisation output (timm ResNets' `x += shortcut`).
                grad_sample_mode="ew",
            )
        anchor = [p.detach().clone() for p in local.parameters()] if self.cfg.regime == "fedprox" else None
        total, count, steps = 0.0, 0, 0
        self.last_batches = []
        for _ in range(self.cfg.fed.local_epochs):
            for images, targets, index in loader:
                if steps >= self.steps_per_round:
                    break
                steps += 1  # an empty Poisson batch is a step too (the accountant counts it)
                self.last_batches.append([int(i) for i in index])
                if len(targets) == 0:  # Poisson sampling drew an empty batch (only under DP)
                    self._empty_batch_dp_step(local, optimizer)
                    continue
                images, targets = images.to(self.device), targets.to(self.device)
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(model(images), targets)
                if not torch.isfinite(loss):
                    raise RunError(f"site {self.index} round {round_index + 1}: loss became {loss.item()}; lower train.lr")
                loss.backward()
                optimizer.step()
                if anchor is not None:
                    self._proximal_step(local, anchor, lr)
                total += loss.item() * len(targets)
                count += len(targets)
        update = spec.flatten(whole) - global_flat
        return update, total / max(count, 1)

    def _check_received(self, global_model: nn.Module, round_index: int) -> None:
        """fed.model_guard: compare the received model with the last one accepted; refuse it or remember it."""
        received = {k: v.detach().to("cpu", copy=True) for k, v in global_model.state_dict().items()}
        if self._guard_ref is not None:
            problem = model_change_problem(self._guard_ref, received, float(self.cfg.fed.model_guard))
            if problem:
                raise ModelGuardError(
                    f"site {self.index} refuses the global model of round {round_index + 1} (fed.model_guard "
                    f"{self.cfg.fed.model_guard:g}): {problem}. A FedAvg round moves the model by a small step; this "
                    "one was changed more than training explains, so the server may be deviating from the protocol "
                    "(crafted weights). Nothing was trained or sent; check the server before going on."
                )
        self._guard_ref = received

    def _empty_batch_dp_step(self, model: nn.Module, optimizer: Any) -> None:
        """DP-SGD on an empty Poisson batch: the noisy sum is pure noise, and the step still costs privacy.

        Skipping it would undercount epsilon (whether a batch is empty depends on the sampling) and leave out
        noise the analysis assumes. Opacus' optimizer takes zero per-sample gradients; ExpandedWeights cannot
        run a forward pass on zero samples, so they are set directly.
        """
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()

    def _proximal_step(self, model: nn.Module, anchor: list[torch.Tensor], lr: float) -> None:
        """FedProx: a gradient step on mu/2 ||w - w_global||^2, taken after the optimizer's step.

        For SGD this equals adding the term to the loss. Kept outside the optimizer
        so DP-SGD never clips or noises it: it does not depend on the data, so it
        costs no privacy.
        """
        mu = self.cfg.fed.mu
        with torch.no_grad():
            for p, a in zip(model.parameters(), anchor):
                if p.requires_grad:
                    p.sub_(lr * mu * (p - a))

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict() if self.accountant is not None else None,
                "model_guard": self._guard_ref}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        if state.get("model_guard") is not None:
            self._guard_ref = state["model_guard"]


def package_update(
    cfg: RunConfig,
    update: np.ndarray,
    n_k: int,
    *,
    size: int,
    he_mask: np.ndarray | None = None,
    secret_ctx: Any = None,
    value_bound: float | None = None,
    compressor: Any = None,
) -> tuple[bytes, bytes | None]:
    """What a site uploads for ``update``: (plaintext part, encrypted part or None).

    * ``fed.secure: he``: the coordinates in ``he_mask``, times ``n_k``, as CKKS
      ciphertexts under the consortium key (``secret_ctx``, a key holder's), the
      rest as float32 bytes;
    * top-k (``compressor``): indices and values with error feedback;
    * otherwise the dense float32 update.

    Raises ValueError/RuntimeError when the site's own software refuses to send
    it (wrong shape; non-finite values under HE). Used by the in-process runner
    and by the remote site alike.
    """

    def as_bytes(values: np.ndarray) -> bytes:
        return tensor_to_bytes(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))

    fed = cfg.fed
    if fed.secure == "he":
        if he_mask is None or secret_ctx is None:
            raise ValueError("fed.secure: he needs the encrypted-coordinate mask and the consortium's secret context")
        if update.shape != he_mask.shape:  # the site's own software notices before encrypting
            raise ValueError(f"update has shape {update.shape}, expected {he_mask.shape}")
        enc = encrypt_update(secret_ctx, update[he_mask].astype(np.float64), float(n_k), value_bound=value_bound)
        return as_bytes(update[~he_mask]), enc
    if fed.secure == "none" and compressor is not None:
        if update.shape != (size,):
            raise ValueError(f"update has shape {update.shape}, expected ({size},)")
        return compressor.compress(update), None
    return as_bytes(update), None
