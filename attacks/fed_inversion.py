"""Gradient inversion on the updates a federation server really received (``fed.transcript``).

For every recorded (round, site) the attacker takes what the server held:

* ``fed.secure: none`` (with or without DP-SGD): the site's update, float32,
  exactly as uploaded;
* ``fed.secure: he``: the site's CKKS ciphertexts, which the server can only
  read without the key (:func:`attacks.keyless.encrypted_update_readout`);

turns it into a pseudo gradient at the broadcast global model,
``-(update) / (local_steps * lr)`` with the learning rate the server itself
broadcast that round, and runs the chosen inversion (Inverting Gradients by
default) with the labels inferred from the last layer (iDLG). The model is
rebuilt from the run's config, as the server knows the architecture, and
loaded with the global model of that round.

Only the scoring (:mod:`attacks.harness`) reads the hospitals' ground truth.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.gradient_inversion import METHODS, InversionResult, gradients_from_update
from attacks.keyless import encrypted_update_readout
from splitfl.fed.flat import FlatSpec
from splitfl.fed.server import build_fed_model, vector_from_bytes
from splitfl.runs.transcript import Transcript, TranscriptError


@dataclass
class FedObservation:
    """One site's upload in one round, as the server held it, and what the attack needs to use it."""

    round: int
    site: int
    view: str  # "plaintext update" | "ciphertexts read without the key"
    update: np.ndarray  # the attacker's reading of the site's update (w_after - w_before), flat
    global_flat: np.ndarray  # the model the server broadcast that round
    lr: float
    local_steps: int  # optimizer steps the site took (public: the server set local_steps/local_epochs)
    batch_size: int  # images per step (public: part of the training config)


def build_attack_model(transcript: Transcript, num_outputs: int, n_channels: int) -> tuple[nn.Module, Any]:
    """The federation's architecture as every party builds it, and its flat spec."""

    cfg = transcript.run_config()
    torch.manual_seed(cfg.seed)
    model = build_fed_model(cfg, num_outputs, n_channels)
    return model, FlatSpec(model)


def fed_observations(transcript: Transcript, site_sizes: list[int]) -> list[FedObservation]:
    """Every recorded (round, site) upload, read as the server can read it."""

    cfg = transcript.config
    fed, train = cfg["fed"], cfg["train"]
    size = sum(int(np.prod(shape)) for _, shape, _ in transcript.meta["parameters"])
    public_context = transcript.server_file("server_public_context.bin")
    observations = []
    for step in sorted(transcript.steps):
        kinds = transcript.steps[step]
        if "global_model" not in kinds:
            continue
        info = transcript.json(step, "round_info")
        global_flat = vector_from_bytes(kinds["global_model"], "global model", size)
        for site in info["chosen"]:
            batch = int(train["batch_size"])
            steps = int(fed["local_epochs"]) * -(-site_sizes[site] // batch)
            if fed.get("local_steps") is not None:
                steps = min(steps, int(fed["local_steps"]))
            plain, enc = kinds.get(f"site{site}_update"), kinds.get(f"site{site}_update_enc")
            if plain is None:
                continue  # the site's upload never arrived (dropped): nothing to attack
            if fed["secure"] == "he":
                if public_context is None:
                    raise TranscriptError(f"{transcript.folder}: an HE run without server_public_context.bin")
                mask = _he_mask(transcript, size)
                update = np.zeros(size, dtype=np.float64)
                update[~mask] = vector_from_bytes(plain, "plaintext part", int((~mask).sum()))
                update[mask] = encrypted_update_readout(enc, public_context, int(mask.sum()))
                view = "ciphertexts read without the key" + ("" if mask.all() else " (+ plaintext layers)")
            elif fed["secure"] == "none" and not fed.get("topk_fraction"):
                update, view = vector_from_bytes(plain, "update", size).astype(np.float64), "plaintext update"
            else:
                raise TranscriptError(f"no reader for fed.secure={fed['secure']!r} with top-k={fed.get('topk_fraction')}")
            observations.append(FedObservation(int(info["round"]), int(site), view, update, global_flat,
                                               float(info["lr"]), steps, min(batch, site_sizes[site])))
    return observations


def aggregate_observations(transcript: Transcript, site_sizes: list[int], rounds: list[int]) -> list[FedObservation]:
    """Each round's aggregate update, from two consecutive broadcasts: what every hospital (and the server) sees.

    Secure aggregation (masks or CKKS) hides the individual updates, not their weighted mean, which becomes the
    next global model. Inverting it is the curious fellow hospital's attack (and the server's, once the mean is
    decrypted); it is a batch of every sampled site's images, mixed with the sites' sample-count weights.
    """

    cfg = transcript.config
    fed, train = cfg["fed"], cfg["train"]
    size = sum(int(np.prod(shape)) for _, shape, _ in transcript.meta["parameters"])
    out = []
    for r in rounds:
        now, later = transcript.payload(r, "global_model"), transcript.payload(r + 1, "global_model")
        if now is None or later is None:
            continue  # the next broadcast was not recorded
        info = transcript.json(r, "round_info")
        before = vector_from_bytes(now, "global model", size)
        mean_update = (vector_from_bytes(later, "global model", size).astype(np.float64) - before) / float(fed["server_lr"])
        batch = int(train["batch_size"])
        steps = [int(fed["local_epochs"]) * -(-site_sizes[k] // batch) for k in info["chosen"]]
        if fed.get("local_steps") is not None:
            steps = [min(n, int(fed["local_steps"])) for n in steps]
        images = sum(min(batch, site_sizes[k]) for k in info["chosen"])
        out.append(FedObservation(int(info["round"]), -1, "aggregate update (every hospital sees it)", mean_update,
                                  before, float(info["lr"]), max(steps), images))
    return out


def _he_mask(transcript: Transcript, size: int) -> np.ndarray:
    """Which coordinates were encrypted (fed.he_layers, matched on the recorded parameter names)."""

    patterns = transcript.config["fed"].get("he_layers") or []
    mask = np.zeros(size, dtype=bool)
    for name, shape, offset in transcript.meta["parameters"]:
        if not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            mask[offset : offset + int(np.prod(shape))] = True
    return mask


def invert(model: nn.Module, spec: Any, obs: FedObservation, image_shape: tuple[int, int, int], method: str,
           **attack_kwargs: Any) -> InversionResult:
    """Reconstruct the batch behind one observed update (the model is loaded with that round's global model)."""
    spec.load_into(model, obs.global_flat)
    model.eval()  # GroupNorm has no running statistics; eval only disables dropout, as the attacker would
    by_name = {e.name: e for e in spec.entries}
    delta = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            e = by_name[name]
            delta.append(torch.from_numpy(-obs.update[e.offset : e.offset + e.size].astype(np.float32)).view(p.shape))
    gradients = gradients_from_update(delta, obs.local_steps, obs.lr)
    if method not in METHODS:
        raise ValueError(f"unknown attack {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](model, gradients, obs.batch_size, image_shape, **attack_kwargs)
