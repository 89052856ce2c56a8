"""Feature-space hijacking (FSHA; Pasquini, Ateniese, Bernaschi, "Unleashing the Tiger", CCS 2021).

A malicious split-learning server does not train the head it was given. It trains, on its *own* images
(:class:`attacks.malicious_split.AttackerImages`: the validation split, never the hospitals'), three networks:

* a **pilot encoder** ``f~`` with the output shape of the hospitals' cut (here the same architecture as the
  hospitals' encoder, which the server knows from the config it coordinates, independently initialised),
* its inverse ``f~^-1`` (an autoencoder with ``f~``, MSE on the auxiliary images),
* a **critic** ``D`` (Wasserstein GAN with gradient penalty, the paper's published setting) that scores
  ``f(x_private)``, the activations the hospitals send, high and ``f~(x_aux)`` low.

The gradient it returns to the hospitals in place of ``dL/d(activations)`` is the gradient of the paper's
adversarial loss ``mean D(f(x_private))`` at the received activations, so the hospitals' own optimizer moves
their encoder ``f`` into ``f~``'s feature space; the server then inverts what it receives with ``f~^-1``.
Losses per step (paper, WGAN-GP variant)::

    hospitals (sent to them as dL/dz):  mean_i D(z_i)                 z_i = f(x_private_i), received
    critic:                             mean D(f~(x_aux)) - mean D(z) + gp * (||grad D(z^)|| - 1)^2
    pilot + decoder:                    ||f~^-1(f~(x_aux)) - x_aux||^2

What differs from the paper, and why:

* the hospitals' optimizer, learning rate and batch are whatever their config says (the paper's client used
  Adam at 1e-5; splitfl's configs use Adam at 1e-3), so their encoder moves about 100 times faster than the
  paper's. The critic therefore takes ``critic_steps`` (5, WGAN-GP's n_critic) updates per hospital step,
  each against a fresh auxiliary batch: with one update it could not keep up and the hijack failed (measured
  on real PneumoniaMNIST, a tiny ResNet cut after stage 1: 0 % leaked after 224 steps with 1 update, 100 %
  after 168 with 5);
* the pilot autoencoder is first trained alone on the auxiliary images (``pretrain_steps``, the server's own
  time before the protocol starts), so the CPU budget goes to the hijack rather than to learning an
  autoencoder from scratch at the paper's learning rate;
* the server sends zero logits: it trains no head, and the hospitals' loss is irrelevant to it (it is the
  constant ``log K``, which a hospital watching its loss would notice).

Against each regime (:func:`run_fsha`):

* ``split-plain``: the activations are plaintext; steering and inversion work as in the paper.
* ``split-he``: the activations and ``dL/dlogits`` arrive as CKKS ciphertexts. The server reads them as a
  keyless server can (secret key guessed 0, :class:`attacks.split_inversion.KeylessReader`, calibrated to
  the pilot's feature statistics), computes the critic's gradient at that reading and returns it as a
  genuine CKKS ciphertext under the consortium's *public* key, in the layout the hospital expects (the
  hospital accepts it and applies it to its encoder). It also inverts the plaintext batch-aggregated head
  update (``dW_k / db_k``, a weighted mean of the batch's activations) with ``f~^-1``.
* ``split-he-full``: ciphertexts only; the same keyless reading, the crafted gradient encrypted with the
  public key (the learning rate, public in the config, folded in as the protocol does), the head's
  encrypted SGD step left honest.

A frozen encoder (``model.freeze_encoder: true``) is itself a defence against FSHA: nothing the server
returns changes ``f``. The server can then still run the passive inversions of :mod:`attacks.split_inversion`
on what it receives (through the public encoder, where its weights are public).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from attacks.config import FSHASettings
from attacks.malicious_split import (
    AttackerImages,
    MaliciousRun,
    ServerFactory,
    malicious_config,
    score_images,
    write_montages,
)
from attacks.reconstruction import Reconstruction
from attacks.runtime import torch_threads
from attacks.split_inversion import InverseDecoder, KeylessReader, calibrate, head_update_estimates
from splitfl.artifacts import write_json
from splitfl.config import RunConfig, build_train_parser, instantiate, run_config_from_namespace
from splitfl.config_help import add_field_help
from splitfl.data import TaskInfo, load_splits
from splitfl.he.keys import SealEngine, engine_for
from splitfl.he.params import max_abs_value
from splitfl.he.wire import EncryptedBatch
from splitfl.models import build_split_model
from splitfl.split.full_server import FullSplitServer, pack_ciphertexts, unpack_ciphertexts
from splitfl.split.guard import LossGuardError
from splitfl.split.server import SplitServer
from splitfl.tensors import ProtocolError, tensor_from_bytes, tensor_to_bytes
from splitfl.transcript import TranscriptRecorder

VIEW_PLAIN = "activations (plaintext): FSHA decoder"
VIEW_KEYLESS = "activation ciphertexts read without the key: FSHA decoder"
VIEW_HEAD = "head update (plaintext): FSHA decoder"
ACTIVATION_SIZED = ("activations_in", "activation_grads_out")  # message kinds not written over a whole-run window


class Critic(nn.Module):
    """WGAN critic on activations: an MLP on flat features, strided convolutions on spatial maps (no batch norm,
    which the gradient penalty forbids)."""

    def __init__(self, feature_shape: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        if len(feature_shape) == 1:
            d = feature_shape[0]
            self.net = nn.Sequential(nn.Linear(d, 4 * width), nn.LeakyReLU(0.2), nn.Linear(4 * width, 4 * width),
                                     nn.LeakyReLU(0.2), nn.Linear(4 * width, 1))
        else:
            c, h, w = feature_shape
            convs = nn.Sequential(nn.Conv2d(c, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2))
            with torch.no_grad():
                flat = convs(torch.zeros(1, c, h, w)).numel()
            self.net = nn.Sequential(*convs, nn.Flatten(), nn.Linear(flat, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(-1)


class FeatureSpaceHijacker:
    """The attacker's networks and per-step updates, the same whatever the regime lets it read."""

    def __init__(self, pilot: nn.Module, feature_shape: tuple[int, ...], auxiliary: torch.Tensor,
                 settings: FSHASettings) -> None:
        self.settings = settings
        self.feature_shape = tuple(int(d) for d in feature_shape)
        self.aux = auxiliary.float()
        self.gen = torch.Generator().manual_seed(settings.seed)
        with torch.random.fork_rng():  # the attacker's initialisation leaves the global RNG as it was
            torch.manual_seed(settings.seed)
            self.pilot = pilot.train()
            for p in self.pilot.parameters():
                p.requires_grad_(True)
            zeros = torch.zeros(self.feature_shape)
            self.decoder = InverseDecoder(self.feature_shape, tuple(self.aux.shape[1:]), zeros, torch.ones_like(zeros),
                                          width=settings.decoder_width)
            self.critic = Critic(self.feature_shape)
        self.opt_ae = torch.optim.Adam([*self.pilot.parameters(), *self.decoder.parameters()], lr=settings.pretrain_lr)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=settings.lr_critic,
                                           betas=tuple(settings.critic_betas))
        self.pub_mean = torch.zeros(self.feature_shape)
        self.pub_std = torch.ones(self.feature_shape)
        self._sums: dict[str, float] = {}
        self._count = 0
        self.history: list[dict[str, float]] = []

    @classmethod
    def for_config(cls, cfg: RunConfig, task: TaskInfo, auxiliary: torch.Tensor,
                   settings: FSHASettings) -> FeatureSpaceHijacker:
        """Pilot = the hospitals' encoder architecture (public: in the config), randomly initialised from the
        attacker's seed (no pretrained checkpoint: the hospitals' weights are not the server's)."""
        arch = dataclasses.replace(cfg.model, pretrained=None, freeze_encoder=False, tune_last_blocks=None)
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed + 1)
            model, _ = build_split_model(arch, task.num_outputs, task.n_channels, cfg.data.size)
        return cls(model.encoder, tuple(model.feature_dim), auxiliary, settings)

    def _aux_batch(self, n: int) -> torch.Tensor:
        return self.aux[torch.randint(len(self.aux), (n,), generator=self.gen)]

    def _autoencoder_step(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        z_pub = self.pilot(x)
        loss = F.mse_loss(self.decoder(z_pub), x)
        self.opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_ae.step()
        z = z_pub.detach()
        self.pub_mean, self.pub_std = z.mean(0), z.std(0).clamp_min(1e-6)
        return z, loss.item()

    def pretrain(self, steps: int, batch: int = 64) -> list[float]:
        """The pilot autoencoder alone on the auxiliary images, then the attack's (paper's) learning rate."""
        losses = [self._autoencoder_step(self._aux_batch(batch))[1] for _ in range(steps)]
        for group in self.opt_ae.param_groups:
            group["lr"] = self.settings.lr_pilot
        return losses

    def adversarial_grad(self, z: torch.Tensor) -> torch.Tensor:
        """What the hospitals receive as dL/dz: the gradient of mean D(z) at the activations the server holds."""
        z = z.detach().float().requires_grad_(True)
        with torch.enable_grad():
            loss = self.critic(z).mean()
            (grad,) = torch.autograd.grad(loss, z)
        self._add(f_loss=loss.item())
        return grad * self.settings.grad_scale

    def _gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        eps = torch.rand((len(real),) + (1,) * (real.dim() - 1), generator=self.gen)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(mix).sum(), mix, create_graph=True)
        return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()

    def update(self, z_private: torch.Tensor) -> None:
        """One server step: the pilot autoencoder on an auxiliary batch, then the critic (private vs pilot)."""
        z_priv = z_private.detach().float()
        z_pub, ae_loss = self._autoencoder_step(self._aux_batch(len(z_priv)))
        for k in range(self.settings.critic_steps):
            if k:
                with torch.no_grad():
                    z_pub = self.pilot(self._aux_batch(len(z_priv)))
            loss = (self.critic(z_pub).mean() - self.critic(z_priv).mean()
                    + self.settings.gp_weight * self._gradient_penalty(z_priv, z_pub))
            self.opt_critic.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_critic.step()
        self._add(ae_loss=ae_loss, critic_loss=loss.item())

    @torch.no_grad()
    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """``f~^-1`` applied to activations (or to the server's reading of them)."""
        return self.decoder(z.float().reshape(-1, *self.feature_shape))

    def calibrated(self, reading: torch.Tensor) -> torch.Tensor:
        """A keyless reading (~1e19, noise) mapped onto the pilot's per-feature mean and std."""
        return calibrate(reading, self.pub_mean.reshape(-1), self.pub_std.reshape(-1)).reshape(-1, *self.feature_shape)

    def _add(self, **values: float) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += "f_loss" in values

    def end_epoch(self) -> dict[str, float]:
        """Mean losses of the epoch's steps (logged, and kept in ``history``)."""
        row = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        self.history.append(row)
        self._sums, self._count = {}, 0
        return row


# ----------------------------------------------------------------------------- the malicious servers


def public_encrypt(eng: SealEngine, values: np.ndarray, parms_id: list, scale: float) -> Any:
    """A genuine CKKS ciphertext of ``values`` made with the public key only: enc(0) plus the encoded plaintext."""
    ct = eng.encrypt_zero(parms_id, scale)
    eng.evaluator.add_plain_inplace(ct, eng.encode(values, parms_id, scale))
    return ct


class FSHAServer(SplitServer):
    """split-plain / split-he: the honest server's checks and recording, FSHA's gradients in place of the head's.

    Its view per training step: ``inversions[step]`` (``f~^-1`` of what it read, kept for recorded steps) and,
    in split-he, ``head_inversions[step]`` (``f~^-1`` of the head update's activation estimate).
    """

    def __init__(self, attack: FeatureSpaceHijacker, head: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any | None, mode: str, public_context: bytes | None = None, batch_capacity: int = 64,
                 recorder: TranscriptRecorder | None = None, feature_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__(head, optimizer, scheduler, mode, public_context, batch_capacity, recorder,  # type: ignore[arg-type]
                         feature_shape, num_classes)
        self.attack = attack
        self.reader = KeylessReader(public_context) if mode == "he" and public_context is not None else None
        self.inversions: dict[int, torch.Tensor] = {}
        self.head_inversions: dict[int, torch.Tensor] = {}
        self._z: torch.Tensor | None = None
        self.disguise = attack.settings.disguise and mode == "plain"
        # False while the window spans the whole run (against split.loss_guard): the inversions and the evaluation
        # key are kept for every step, the activation-sized payloads (MBs per step at an early cut) are not written
        self.keep_payloads = True

    def _record(self, kind: str, payload: bytes, train: bool, layer: int = 0) -> None:
        if self.keep_payloads or kind not in ACTIVATION_SIZED:
            super()._record(kind, payload, train, layer)

    def _recording(self) -> int | None:
        rec = self.recorder
        return rec.step if rec is not None and rec.active else None

    def forward(self, payload: bytes, train: bool = True, layer: int = 0) -> bytes:
        if self.mode == "he":
            reply = super().forward(payload, train, layer)  # the (unused) head on ciphertexts, as the protocol wants
            if train and layer == 0:
                self._hold(self.attack.calibrated(self.reader.activations(payload)))
            return reply
        if self.disguise:  # the honest head's logits (it records the messages), FSHA on the side
            reply = super().forward(payload, train, layer)
            if train:
                self._hold(self._saved[0].detach())  # the activations the honest forward parsed and kept
            return reply
        self._record("activations_in", payload, train, layer)
        x = tensor_from_bytes(payload, "activations", (None, *self.feature_shape))
        if train:
            self._hold(x)
        reply = tensor_to_bytes(torch.zeros(len(x), self.num_classes))  # no head: the hospitals' loss is irrelevant
        self._record("logits_out", reply, train, layer)
        return reply

    def _hold(self, z: torch.Tensor) -> None:
        self._z = z
        step = self._recording()
        if step is not None:
            self.inversions[step] = self.attack.invert(z)

    def backward(self, payload: bytes, layer: int | None = None) -> bytes:
        layer = max(len(self.layers) - 1, 0) if layer is None else layer
        if self.mode == "he" and layer != 0:  # an MLP head's hidden layer: honest (only the cut matters to FSHA)
            return super().backward(payload, layer)
        self._record("logit_grads_in", payload, True, layer)
        if self._z is None:
            raise ProtocolError("backward without a preceding training forward")
        z, self._z = self._z, None
        if self.mode == "he":
            enc = EncryptedBatch.from_bytes(self.context, payload, expect_kind="logit_grads",
                                            expect_dim=self.layers[layer].out_features)
            grad = self.attack.adversarial_grad(z)
            self.attack.update(z)
            reply = self._encrypt_grads(grad.reshape(len(z), -1)[: enc.batch], enc)
        else:
            g = tensor_from_bytes(payload, "logit gradient", (len(z), self.num_classes))  # checked
            if self.disguise:  # the honest head learns from the hospitals' logit gradients; its dL/dz is dropped
                _, out = self._saved
                self.optimizer.zero_grad(set_to_none=True)
                out.backward(g)
                self.optimizer.step()
                self._saved = None
            grad = self.attack.adversarial_grad(z)
            self.attack.update(z)
            reply = tensor_to_bytes(grad)
        self._record("activation_grads_out", reply, True, layer)
        if self.mode == "plain" and self.recorder is not None:
            self.recorder.next_step()
        return reply

    def _encrypt_grads(self, grad: torch.Tensor, enc_g: EncryptedBatch) -> bytes:
        """The crafted gradient as the hospital expects an activation-gradient reply: one rescale down, public key."""
        eng = engine_for(self.context)
        lay = enc_g.layout
        slots = lay.pack_activations(grad.detach().double().numpy())
        payloads = [eng.save(public_encrypt(eng, v, eng.next_parms_id, eng.scale)) for v in slots]
        return EncryptedBatch("activation_grads", enc_g.batch, lay.in_features, lay, payloads,
                              max_abs_value(eng.params), eng.fingerprint, self.context).to_bytes()

    def apply_update(self, payload: bytes) -> None:
        """split-he: the plaintext head update; its activation estimate is inverted too, then the honest step."""
        step = self._recording()
        flat = self.read_update(payload)
        if step is not None and self.layers:
            lin = self.layers[0]
            est = head_update_estimates(flat, lin.in_features, lin.out_features)
            if torch.isfinite(est).all():
                self.head_inversions[step] = self.attack.invert(est[None])
        self.step_head(flat)
        if self.recorder is not None:
            self.recorder.next_step()

    def end_epoch(self) -> None:
        super().end_epoch()
        self.attack.end_epoch()


class FSHAFullServer(FullSplitServer):
    """split-he-full: ``enc(W)`` trained honestly; the returned ``enc(dL/dx)`` is FSHA's, made with the public key."""

    def __init__(self, attack: FeatureSpaceHijacker, public_context: bytes, in_features: int, num_classes: int,
                 batch_capacity: int, initial_weights: bytes, refresh_every: int,
                 recorder: TranscriptRecorder | None = None) -> None:
        super().__init__(public_context, in_features, num_classes, batch_capacity, initial_weights, refresh_every,
                         recorder)
        self.attack = attack
        self.reader = KeylessReader(public_context)
        self.meta = {"in_features": in_features, "num_classes": num_classes, "batch_size": batch_capacity}
        self.inversions: dict[int, torch.Tensor] = {}
        self.head_inversions: dict[int, torch.Tensor] = {}
        self._z: torch.Tensor | None = None
        self.keep_payloads = True  # as FSHAServer's

    def _record(self, kind: str, payload: bytes, train: bool = True) -> None:
        if self.keep_payloads or kind not in ACTIVATION_SIZED:
            super()._record(kind, payload, train)

    def forward(self, payload: bytes, train: bool = True) -> bytes:
        reply = super().forward(payload, train)
        if train:
            self._z = self.attack.calibrated(self.reader.full_activations(payload, self.meta))
            rec = self.recorder
            if rec is not None and rec.active:
                self.inversions[rec.step] = self.attack.invert(self._z)
        return reply

    def backward(self, payload: bytes, input_grad: bool) -> bytes | None:
        self._record("logit_grads_in", payload, True)
        if self._z is None:
            raise ProtocolError("backward without a preceding training forward")
        z, self._z = self._z, None
        cts = unpack_ciphertexts(payload, self.layout.backward_count(input_grad), "backward message")
        self.head.backward(cts[self.layout.pairs:] if input_grad else cts, False)  # the update only
        grad = self.attack.adversarial_grad(z)
        self.attack.update(z)
        reply = None
        if input_grad:
            eng = self.head.eng
            # the hospital divides by the batch capacity (it sent enc(B G)); pack_activations' extra bias column
            # is never read back (unpack_activation_grads keeps in_features)
            slots = self.layout.pack_activations(self.layout.batch_size * grad.detach().double().numpy())
            reply = pack_ciphertexts([eng.save(public_encrypt(eng, v.astype(np.complex128), eng.first_parms_id,
                                                              eng.scale)) for v in slots])
            self._record("activation_grads_out", reply, True)
        if self.recorder is not None:
            self.recorder.next_step()
        return reply

    def end_epoch(self) -> None:
        self.attack.end_epoch()


def fsha_factory(attack: FeatureSpaceHijacker, cfg: RunConfig) -> ServerFactory:
    """The server factory :class:`splitfl.split.runner.SplitRunner` calls, giving FSHA servers of the right mode."""

    def make(head: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None, mode: str,
             public_context: bytes | None = None, batch_capacity: int = 64,
             recorder: TranscriptRecorder | None = None, initial_weights: bytes | None = None,
             **shapes: Any) -> Any:
        if mode == "he-full":
            lin = head if isinstance(head, nn.Linear) else next(iter(head.linear_layers()))
            return FSHAFullServer(attack, public_context,  # type: ignore[arg-type]
                                  lin.in_features, lin.out_features, batch_capacity, initial_weights,  # type: ignore[arg-type]
                                  cfg.split.full_refresh_every, recorder)
        return FSHAServer(attack, head, optimizer, scheduler, mode, public_context, batch_capacity, recorder, **shapes)

    return make


# ----------------------------------------------------------------------------- the run


def run_fsha(cfg: RunConfig, out_dir: str | Path, settings: FSHASettings | None = None,
             regime: str | None = None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train the hospitals (real code, ``cfg.train.epochs`` epochs) against an FSHA server, then score its inversions.

    Writes ``out_dir/leakage.json``, ``out_dir/montage*.png`` and the run (transcript window, keys) under
    ``out_dir/run``; returns leakage.json's content (JSON-able): leakage rate, chance rate and p-value, SSIM
    and PSNR means of the strongest view, every view in ``by_view``, the montage paths, timings.
    """
    settings = settings or FSHASettings()
    cfg = malicious_config(cfg, regime)
    out_dir = Path(out_dir)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with torch_threads(1):
        splits = load_splits(cfg.data)
        images = AttackerImages.from_splits(splits, settings.distractors, settings.aux_from_test)
        attack = FeatureSpaceHijacker.for_config(cfg, splits.task, images.auxiliary, settings)
        pre = attack.pretrain(settings.pretrain_steps)
        t_pre = time.perf_counter()
        log(f"[fsha {cfg.regime}] pilot autoencoder pretrained on {len(images.auxiliary)} auxiliary images: "
            f"{settings.pretrain_steps} steps, MSE {np.mean(pre[-20:]) if pre else float('nan'):.4f}")
        run = MaliciousRun(cfg, out_dir / "run", fsha_factory(attack, cfg), splits)
        guarded = run.runner.loss_guard is not None
        if guarded:  # the hospitals may stop at any step: every step's inversion is kept, the last ones scored
            run.server.keep_payloads = False
        refused = None
        try:
            run.train(cfg.train.epochs, settings.observations,
                      lambda m: log(f"{m}; attacker {attack.history[-1] if attack.history else {}}"), whole_run=guarded)
        except LossGuardError as exc:  # the hospitals' check stopped training: the server gets nothing more
            refused = str(exc)
            log(f"[fsha {cfg.regime}] {refused}")
        t_train = time.perf_counter()
        server = run.server
        recs = []
        for step, (site, indices) in sorted(run.truth().items())[-settings.observations:]:
            label = f"step {step} site {site}"
            if step in server.inversions:
                view = VIEW_KEYLESS if cfg.regime != "split-plain" else VIEW_PLAIN
                recs.append(Reconstruction(label, view, site, indices, server.inversions[step]))
            if step in server.head_inversions:
                recs.append(Reconstruction(label, VIEW_HEAD, site, indices, server.head_inversions[step]))
        scored = score_images(recs, run.sites, images.outside, settings.margin)
    montages = write_montages(scored, out_dir, f"FSHA, {cfg.regime}", settings.montage_images)
    summary = scored["summary"]
    result = {
        "attack": "fsha", "regime": cfg.regime, "model": cfg.model.name, "cut": cfg.model.cut,
        "encoder_trainable": run.runner.encoder_trainable, "feature_shape": list(attack.feature_shape),
        "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs, "hospital_steps": run.steps,
        "auxiliary_images": len(images.auxiliary), "distractors": len(images.outside),
        "settings": dataclasses.asdict(settings),
        **summary,
        "montage": montages.get("montage"), "montages": montages,
        "hospital_losses": run.losses, "attacker_history": attack.history,
        "disguise": server.disguise if hasattr(server, "disguise") else False,
        "loss_guard": ({"steps": cfg.split.loss_guard_steps, "ratio": cfg.split.loss_guard_ratio,
                        "step_losses": run.runner.loss_guard.losses} if guarded else None),
        "refused": refused,
        "seconds": {"pretrain": t_pre - t0, "train": t_train - t_pre, "total": time.perf_counter() - t0,
                    "cpu": time.process_time() - cpu0},
        "per_image": scored["rows"],
    }
    write_json(out_dir / "leakage.json", result)
    log(f"[fsha {cfg.regime}] leakage {summary.get('leakage_rate', 0.0):.0%} of {summary['images']} images "
        f"(chance {summary.get('chance_leakage_rate', 0.0):.2%}, p {summary.get('chance_p_value', 1.0):.3g}), "
        f"SSIM {summary.get('ssim_mean')}, {result['seconds']['total']:.0f} s")
    return result


def build_parser() -> Any:
    """``python -m attacks.fsha``: a run config (``splitfl train``'s keys and --config) plus ``--fsha.*``."""
    parser = build_train_parser()
    parser.description = ("FSHA (Pasquini et al., CCS 2021): train the hospitals' real split code against a "
                          "feature-space-hijacking server and score its inversions; writes OUT/leakage.json and "
                          "OUT/montage*.png")
    parser.add_class_arguments(FSHASettings, "fsha")
    add_field_help(parser, FSHASettings, "fsha.")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    ns = instantiate(parser, parser.parse_args(argv))
    return run_fsha(run_config_from_namespace(ns), ns.out, ns.fsha)


if __name__ == "__main__":
    main()
