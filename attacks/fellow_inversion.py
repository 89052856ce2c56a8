"""The curious fellow hospital in split learning: images of other hospitals from the relayed encoder.

In sequential split learning (``split-plain`` and ``split-he`` with a trainable encoder) the
hospitals hand the encoder on to each other after every step (:class:`splitfl.transcript.
RelayRecorder` records what each one receives). A hospital that receives the encoder subtracts the
version it last sent on: the difference is ``-lr`` times the sum of the encoder gradients of the
steps taken in between by the other hospitals (exactly one step with two hospitals, SGD without
momentum). That is a gradient of the *encoder only*: the upstream gradient ``g_i = dL/da_i`` at the
cut comes from the server's head and the other hospital's labels, which the attacker does not have.

The attack (Inverting Gradients with the upstream gradient as a free variable): optimise dummy
images ``x`` and upstream gradients ``g`` so that ``grad_theta sum_i <enc(x_i), g_i>`` matches the
observed difference in cosine, plus ``tv * TV(x)``. ``x`` gets signed Adam and is boxed to the input
range, as in :func:`attacks.gradient_inversion.inverting_gradients`; ``g`` gets plain Adam (the
cosine is scale-free in ``g``, so its step is set relative to its initial scale). The encoder runs
in train mode on each step's dummy batch separately, as it ran in training (BatchNorm statistics
are per batch). Encryption between hospital and server does not enter: the relay is hospital to
hospital, so split-he leaks to a fellow hospital what split-plain leaks, and DP on the head updates
(``split.dp_noise_multiplier``) does not cover it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attacks.gradient_inversion import cosine_gradient_loss, total_variation
from attacks.reconstruction import Reconstruction
from attacks.split_inversion import known_encoder
from splitfl.runs.transcript import Transcript, TranscriptError
from splitfl.tensors import tensor_from_bytes

FELLOW_PREFIX = "fellow hospital: "
VIEW_RELAY = FELLOW_PREFIX + "relayed encoder update"
G_INIT = 0.01  # initial scale of the dummy upstream gradients
G_LR = 1e-3  # their Adam step: 10% of the initial scale (the cosine loss does not see g's scale)


@dataclass
class RelayObservation:
    """One encoder hand-over: what the receiving hospital had, what it got, and the steps in between."""

    receiver: int
    before: torch.Tensor  # the flat encoder weights the receiver last held (sent on after its own step)
    after: torch.Tensor  # the flat weights it receives
    steps: list[int]  # the other hospitals' steps the difference spans
    lr: float


def read_relay(folder: Path) -> tuple[torch.Tensor, list[dict[str, Any]], dict[int, torch.Tensor]]:
    """(initial weights, index rows in step order, weights sent on after each recorded step)."""

    index = folder / "index.jsonl"
    if not (folder / "initial.bin").is_file() or not index.is_file():
        raise TranscriptError(f"{folder}: no relayed encoder recorded (train split-plain/split-he with "
                              "model.freeze_encoder: false and split.transcript: true)")
    initial = tensor_from_bytes((folder / "initial.bin").read_bytes(), "relay initial weights", (None,))
    rows = sorted((json.loads(line) for line in index.read_text().splitlines() if line.strip()), key=lambda r: r["step"])
    weights = {r["step"]: tensor_from_bytes((folder / r["file"]).read_bytes(), f"relay step {r['step']}",
                                            (len(initial),)) for r in rows}
    return initial, rows, weights


def relay_observations(initial: torch.Tensor, rows: list[dict[str, Any]],
                       weights: dict[int, torch.Tensor]) -> list[RelayObservation]:
    """Every hand-over to a hospital other than the sender, as that hospital sees it.

    The receiver of step ``t``'s weights is the hospital of step ``t + 1`` (the round-robin order);
    the last recorded step has no recorded receiver and is skipped.
    """
    out = []
    for k in range(len(rows) - 1):
        sender, receiver = rows[k]["site"], rows[k + 1]["site"]
        if receiver == sender:  # a hospital's consecutive steps (the others ran out of batches): nothing new
            continue
        own = [r for r in rows[:k] if r["site"] == receiver]
        before = weights[own[-1]["step"]] if own else initial
        start = own[-1]["step"] + 1 if own else rows[0]["step"]
        steps = [r["step"] for r in rows[: k + 1] if r["step"] >= start]
        out.append(RelayObservation(receiver, before, weights[rows[k]["step"]], steps, float(rows[k]["lr"])))
    return out


def load_flat(module: nn.Module, flat: torch.Tensor) -> None:
    """Put a flat vector into the module's trainable parameters (the order of ``parameters()``)."""
    params = [p for p in module.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if total != flat.numel():
        raise TranscriptError(f"relayed encoder has {flat.numel()} weights, the rebuilt encoder {total}: "
                              "is the run config (model.name, cut, size) the one recorded?")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()


def invert_encoder_update(encoder: nn.Module, gradient: torch.Tensor, batch_sizes: list[int],
                          feature_shape: tuple[int, ...], image_shape: tuple[int, ...], iterations: int = 4000,
                          lr: float = 0.1, tv_weight: float = 1e-3, restarts: int = 1, seed: int = 0,
                          bounds: tuple[float, float] = (-1.0, 1.0)) -> tuple[torch.Tensor, float]:
    """Images behind an encoder gradient whose upstream gradient is unknown; returns (images, final cosine loss).

    ``encoder`` holds the weights the gradient was taken at and runs in train mode;
    ``batch_sizes``: the images of each step, run through the encoder as separate batches.
    """
    params = [p for p in encoder.parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    target = list(gradient.split([math.prod(s) for s in shapes]))
    target = [t.view(s) for t, s in zip(target, shapes)]
    n = sum(batch_sizes)
    gen = torch.Generator().manual_seed(seed)
    milestones = [max(1, int(iterations * f)) for f in (3 / 8, 5 / 8, 7 / 8)]
    best: tuple[float, torch.Tensor] = (math.inf, torch.empty((0, *image_shape)))
    for _ in range(max(1, restarts)):
        x = (0.1 * torch.randn((n, *image_shape), generator=gen)).clamp(*bounds).requires_grad_(True)
        g = (G_INIT * torch.randn((n, *feature_shape), generator=gen)).requires_grad_(True)
        opt_x, opt_g = torch.optim.Adam([x], lr=lr), torch.optim.Adam([g], lr=G_LR)
        scheds = [torch.optim.lr_scheduler.MultiStepLR(o, milestones, 0.1) for o in (opt_x, opt_g)]

        def match(images: torch.Tensor, upstream: torch.Tensor, create_graph: bool) -> torch.Tensor:
            inner = sum((encoder(xs) * gs).sum() for xs, gs in zip(images.split(batch_sizes), upstream.split(batch_sizes)))
            dummy = torch.autograd.grad(inner, params, create_graph=create_graph)
            return cosine_gradient_loss(dummy, target)

        for _ in range(iterations):
            loss = match(x, g, True) + tv_weight * total_variation(x)
            grad_x, grad_g = torch.autograd.grad(loss, [x, g])
            x.grad, g.grad = grad_x.sign(), grad_g
            opt_x.step()
            opt_g.step()
            for s in scheds:
                s.step()
            with torch.no_grad():
                x.clamp_(*bounds)
        final = float(match(x.detach(), g.detach(), False))
        if final < best[0]:
            best = (final, x.detach().clone())
    return best[1], best[0]


def attack_relay(run_dir: Path, settings: Any, data: Any, transcript: Transcript) -> list[Any]:
    """Reconstructions of the other hospitals' images from every recorded encoder hand-over."""

    initial, rows, weights = read_relay(run_dir / "relay")
    cfg = transcript.run_config()
    encoder, feature_shape = known_encoder(cfg, data.task.num_outputs, data.task.n_channels)
    for p in encoder.parameters():
        p.requires_grad_(True)
    encoder.train()  # as the hospitals ran it while training
    batch = cfg.train.batch_size  # public (the run's config); the evaluation key is not read here
    out = []
    observations = relay_observations(initial, rows, weights)[: settings.max_observations]
    for k, obs in enumerate(observations):
        start = time.perf_counter()
        load_flat(encoder, obs.before)
        gradient = (obs.before - obs.after) / max(obs.lr, 1e-12)
        images, _ = invert_encoder_update(encoder, gradient, [batch] * len(obs.steps), feature_shape,
                                          tuple(data.image_shape), settings.fellow_iterations, settings.lr,
                                          settings.tv_weight, settings.restarts, settings.seed + k)
        sources = [(site, i) for step in obs.steps for site, indices in [transcript.split_truth(step)] for i in indices]
        out.append(Reconstruction(f"hospital {obs.receiver} receives step {obs.steps[-1]}", VIEW_RELAY, -1, [],
                                  images, None, time.perf_counter() - start, sources=sources))
    return out
