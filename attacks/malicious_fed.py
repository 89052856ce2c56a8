"""A malicious FedAvg server: the imprint-module attack ("Robbing the Fed", Fowl et al., ICLR 2022) against
splitfl's real, unmodified hospital code.

**Threat model: what the attacker controls.** The attacker runs the federation server (the seat of
:class:`splitfl.fed.server.FedServerCore`) and, before training starts, writes the consortium's model
configuration. It controls

* *the agreed architecture*: ``model.name: imprint_resnet18`` names a timm model this module registers,
  ResNet-18 behind an :class:`~attacks.imprint.ImprintBlock` (``out = x + W2 ReLU(W1 x + b1)``). In the
  agreed initial model the block is the identity (``W2 = 0``), so the network trains and predicts as a
  ResNet-18 and the block passes for a harmless input adapter. The hospitals build it by name through
  the project's model factory with their own code (:func:`splitfl.fed.server.build_fed_model`); in a
  deployment they would have to install the package that registers the name, which the attacker ships
  as the consortium's model code (in-process, importing this module registers it);
* *the global model it broadcasts*: in the attacked round it writes calibrated imprint weights
  (:meth:`ImprintBlock.calibrate` on its own images) into the block and broadcasts the rest of the
  model as trained. Parameter names and shapes do not change;
* *nothing at the hospitals*: they run :class:`splitfl.fed.site.Site` as shipped (their local epochs,
  optimizer and momentum, Opacus DP-SGD, CKKS encryption) on their own images.

The attack reads only what the server receives: each site's upload (the float32 update; under
``fed.secure: he`` CKKS ciphertexts, read without the key as :mod:`attacks.keyless` does) and the
round's aggregate (under HE a key holder decrypts the sum and hands the mean back to the server,
:meth:`FedServerCore.complete_he`; every hospital sees it as the next global model). It knows the public
configuration (batch size, learning rate, local epochs, each site's sample count) and has images of
the task's kind of its own (the dataset's validation split and training images no hospital holds).
It never touches a hospital's images or labels; the scoring alone reads them, afterwards.

**Why it works through local training.** Every bin of the block adds ``sum_n g_n x_n`` to its row of W1
and ``sum_n g_n`` to its bias, summed over every step and image, weighted by the optimizer's step sizes
and momentum; consecutive rows still differ by the images in one bin, so the ratio of differences is an
image wherever a bin holds one (see :mod:`attacks.imprint`). What several local steps break is bin
*membership*: after the first step W1's rows carry the first batch's images, no longer one measurement,
and later images can fall into shifted bins. How far they shift against the bin width scales as
``lr / gain**2``, while the float32 rounding of the received update costs precision as ``gain**2 / lr``:
the attacker picks ``gain`` (:func:`choose_gain`) by simulating a hospital's round on its own images
with the hospital's public code and settings.

**Which defences hold** (measured on PneumoniaMNIST and RetinaMNIST with ResNet-18, numbers in
attacks/README.md, "Malicious server"):

* DP-SGD (Opacus, per-sample clipping and Gaussian noise): each bin's image is a tiny part of a clipped
  per-sample gradient while the noise is per coordinate, so noise far below any useful epsilon already
  leaves nothing; clipping alone does not (the clipping factor cancels in the ratio).
* ``fed.secure: he``: each site's ciphertexts read without the key give noise, but the decrypted
  aggregate leaks like one large batch of every site's images; and the server decides who takes part,
  so a round in which it samples one site alone (``ImprintSettings.isolate``) makes the "aggregate"
  that site's update. A key holder counting the sites in a sum does not stop it: that count is in the
  header the server writes, and the server holds the public key to pad a sum with encryptions of zero;
  only participation the hospitals can verify (signed contributions) would.
* ``fed.model_guard`` (hospital side): a site refuses a model whose block moved by more than the bound
  since the previous round, so the one-round switch gets nothing. It cannot stop a block that is active
  from the first model a site receives (trusted on first use; or an architecture whose agreed
  initialisation *is* the imprint: the crafted model is the agreed one, there is nothing to compare
  against), and it only delays a server that walks the block in by guard-sized steps over a few rounds
  (``ImprintSettings.ramp``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from attacks.config import ImprintSettings
from attacks.imprint import IMPRINT_BIAS, IMPRINT_WEIGHT, ImprintBlock, recover
from attacks.imprint_model import (
    DEFAULT_BINS,
    IMPRINT_MODEL_PREFIX,
    ImprintFront,
    imprint_resnet18,
    imprint_splitfl_lenet,
)
from attacks.keyless import ciphertext_slots_readout, zero_key_decryptor
from attacks.leakage import MIN_DISTRACTORS, chance_summary
from attacks.metrics import DEFAULT_VALUE_RANGE, pairwise_ssim
from attacks.plots import plot_montage
from attacks.reconstruction import Reconstruction
from attacks.runtime import torch_threads
from attacks.scoring import ScoredImage, curves, distractor_pool, score_observation
from splitfl.artifacts import write_json
from splitfl.config import RunConfig, run_config_from_dict
from splitfl.data import ArrayDataset, DataSplits, cap_train, load_splits, partition_dataset, stratified_subset
from splitfl.engine import RunError, make_fabric
from splitfl.fed.flat import FlatSpec
from splitfl.fed.runner import FedRunner
from splitfl.fed.server import FedServerCore, RoundAcc
from splitfl.fed.site import GUARD_FLOOR_RMS, ModelGuardError, Site
from splitfl.he.aggregation import load_update, values_per_ciphertext
from splitfl.he.keys import engine_for
from splitfl.metrics import make_loss

__all__ = [
    "IMPRINT_MODEL_PREFIX",
    "REGIMES",
    "ImprintFront",
    "ImprintSettings",
    "MaliciousFedServer",
    "choose_gain",
    "imprint_resnet18",
    "imprint_splitfl_lenet",
    "malicious_config",
    "run_imprint_attack",
]

# Largest W1 (bins x pixels) the attacker puts in: DP-SGD's per-sample gradients and HE's ciphertexts grow with it.
MAX_BLOCK_WEIGHTS = 1 << 23
REGIMES = ("fedavg", "fedavg+dp", "fedavg+he")
RECOVERED_SSIM = 0.9  # choose_gain's yardstick on the attacker's own images (no hospital data)
VIEW_SITE = "site update"
VIEW_CIPHERTEXT = "site ciphertexts read without the key"
VIEW_AGGREGATE = "decrypted aggregate of the round"


# --------------------------------------------------------------------------- the attacker's settings and config


def _images_per_site(settings: ImprintSettings, batch_size: int) -> int:
    return int(settings.local_steps) * int(batch_size)


def malicious_config(cfg: RunConfig, regime: str, batch_size: int, settings: ImprintSettings,
                     bins: int | None = None) -> RunConfig:
    """The consortium config the attacker got agreed: ``cfg`` with its model behind the imprint block.

    ``regime``: ``fedavg``, ``fedavg+dp`` (Opacus DP-SGD at the sites; the config's DP keys, else
    ``settings.dp_noise_multiplier``) or ``fedavg+he`` (``fed.secure: he``). Each of ``num_sites`` IID
    hospitals holds ``local_steps x batch_size`` images and trains one local epoch per round, so the
    attacked update is ``local_steps`` optimizer steps with the config's optimizer and learning rate.
    """
    if regime not in REGIMES:
        raise RunError(f"regime {regime!r}: the malicious FedAvg server attacks one of {', '.join(REGIMES)}")
    if batch_size < 1 or settings.local_steps < 1 or settings.attack_round < 0:
        raise RunError(f"batch_size={batch_size}, local_steps={settings.local_steps} must be >= 1 and "
                       f"attack_round={settings.attack_round} >= 0")
    run = copy.deepcopy(cfg)
    run.regime = "fedavg"
    sites = int(settings.num_sites or run.data.partition.num_sites)
    run.data.partition = dataclasses.replace(run.data.partition, scheme="iid", num_sites=sites)
    run.data.max_train = sites * _images_per_site(settings, batch_size)
    name = run.model.name
    if not name.startswith(IMPRINT_MODEL_PREFIX):
        name = IMPRINT_MODEL_PREFIX + name
    run.model = dataclasses.replace(run.model, name=name, cut="pooled", pretrained=None, freeze_encoder=False,
                                    tune_last_blocks=None,
                                    timm_kwargs={**run.model.timm_kwargs, "imprint_bins": int(bins or DEFAULT_BINS)})
    run.train = dataclasses.replace(run.train, batch_size=int(batch_size), epochs=max(run.train.epochs,
                                                                                     settings.attack_round + 1),
                                    progress=False)
    fed = dataclasses.replace(run.fed, local_epochs=1, local_steps=None, client_fraction=1.0, min_sites=1,
                              transcript=bool(settings.transcript),
                              transcript_max_rounds=(settings.max_rounds if settings.ramp is not None
                                                     else settings.attack_round + 1),
                              topk_fraction=0.0, aggregator="mean", secure="none",
                              dp_noise_multiplier=0.0, dp_target_epsilon=None)
    if regime == "fedavg+he":
        fed.secure = "he"
    if regime == "fedavg+dp":
        has_dp = cfg.fed.dp_noise_multiplier > 0 or cfg.fed.dp_target_epsilon is not None
        fed.dp_noise_multiplier = cfg.fed.dp_noise_multiplier if has_dp else float(settings.dp_noise_multiplier)
        fed.dp_target_epsilon = cfg.fed.dp_target_epsilon if has_dp and cfg.fed.dp_noise_multiplier <= 0 else None
    if settings.model_guard is not None:
        fed.model_guard = float(settings.model_guard)
    run.fed = fed
    return run


# --------------------------------------------------------------------------- where the block sits in the flat vector


@dataclass(frozen=True)
class BlockLayout:
    """Offsets of W1, b1 and W2 of the imprint block in the federation's flat vector (public: FlatSpec's names)."""

    w1: tuple[int, int]  # (offset, size)
    b1: tuple[int, int]
    w2: tuple[int, int]
    bins: int
    image_shape: tuple[int, int, int]

    @classmethod
    def of(cls, spec: FlatSpec, image_shape: Sequence[int]) -> BlockLayout:
        def find(suffix: str) -> Any:
            hits = [e for e in spec.entries if e.name == suffix or e.name.endswith("." + suffix)]
            if len(hits) != 1:
                raise RunError(f"the federated model has {len(hits)} parameters named *{suffix}; the malicious "
                               f"server needs exactly one (model.name {IMPRINT_MODEL_PREFIX}...)")
            return hits[0]

        w1, b1, w2 = find(IMPRINT_WEIGHT), find(IMPRINT_BIAS), find("imprint.linear_out.weight")
        return cls((w1.offset, w1.size), (b1.offset, b1.size), (w2.offset, w2.size), int(w1.shape[0]),
                   tuple(int(v) for v in image_shape))  # type: ignore[arg-type]

    def take(self, flat: np.ndarray, which: str) -> np.ndarray:
        offset, size = getattr(self, which)
        return flat[offset:offset + size]

    def imprint_indices(self) -> np.ndarray:
        """Flat indices of W1 then b1: all the decoding reads."""
        return np.concatenate([np.arange(self.w1[0], self.w1[0] + self.w1[1]),
                               np.arange(self.b1[0], self.b1[0] + self.b1[1])])

    def decode(self, w1_b1: np.ndarray, limit: int | None) -> torch.Tensor:
        """Candidate images out of W1's and b1's update (concatenated as :meth:`imprint_indices` orders them)."""
        values = torch.from_numpy(np.asarray(w1_b1, dtype=np.float64))
        w = values[:self.w1[1]].reshape(self.bins, -1)
        b = values[self.w1[1]:]
        if not torch.isfinite(values).all():
            w, b = torch.nan_to_num(w), torch.nan_to_num(b)
        return recover(w, b, self.image_shape, limit=limit).float()


def craft_block(global_flat: np.ndarray, layout: BlockLayout, block: ImprintBlock) -> np.ndarray:
    """The global vector with ``block``'s W1, b1 and W2 written into the imprint block (the rest untouched)."""
    out = np.array(global_flat, dtype=np.float32, copy=True)
    for which, tensor in (("w1", block.linear_in.weight), ("b1", block.linear_in.bias), ("w2", block.linear_out.weight)):
        offset, size = getattr(layout, which)
        out[offset:offset + size] = tensor.detach().reshape(-1).float().numpy()
    return out


def ramp_step(previous: np.ndarray, target: np.ndarray, bound: float, share: float) -> np.ndarray:
    """One broadcast of the block on its way to ``target`` that ``fed.model_guard`` = ``bound`` lets through.

    The guard allows a tensor to move by ``bound x max(||previous||, GUARD_FLOOR_RMS sqrt(size))``; the
    step takes ``share`` of that (the rest is margin), or lands on ``target`` when it is that close.
    """
    prev = previous.astype(np.float64)
    diff = target.astype(np.float64) - prev
    allowed = share * bound * max(float(np.linalg.norm(prev)), GUARD_FLOOR_RMS * math.sqrt(max(prev.size, 1)))
    dist = float(np.linalg.norm(diff))
    if dist <= allowed:
        return np.array(target, dtype=np.float32, copy=True)
    return (prev + diff * (allowed / dist)).astype(np.float32)


# --------------------------------------------------------------------------- the server


class MaliciousFedServer(FedServerCore):
    """The real FedAvg server core, deviating in one place: the broadcast of ``attack_round``.

    At the start of that round it writes a calibrated imprint block (``make_block``) into the global
    model and broadcasts it; the in-process transport is the runner's model object, which every
    :class:`Site` copies, so the server loads its vector into it (over gRPC the same vector would go out
    as bytes). Everything else is :class:`FedServerCore`: it validates, aggregates and applies as usual.
    Of what it receives it keeps the imprint block's coordinates: each site's plaintext update, each
    site's ciphertexts read without the key, and the round's aggregate (decrypted by a key holder under HE).
    """

    def __init__(self, honest: FedServerCore, spec: FlatSpec, broadcast: nn.Module, layout: BlockLayout,
                 make_block: Callable[[np.ndarray, float | None], ImprintBlock] | None, attack_round: int,
                 ramp: tuple[float, float] | None = None, isolate: int | None = None) -> None:
        super().__init__(honest.cfg, honest.size, honest.global_flat, honest.site_sizes, he_mask=honest.he_mask,
                         public_ctx=honest.public_ctx, log=honest.log)
        self.recorder = honest.recorder
        self.spec, self.broadcast, self.layout = spec, broadcast, layout
        self.make_block, self.attack_round = make_block, int(attack_round)
        # ramp: (the hospitals' fed.model_guard bound, the share of it each step takes); the attack waits for arrival
        self.ramp, self.ramp_from = ramp, int(attack_round)
        self.ramp_rounds = 0
        if ramp is not None:
            self.attack_round = -1
        self._target: dict[str, np.ndarray] | None = None
        self._last: dict[str, np.ndarray] | None = None  # the block as last broadcast
        self.block: ImprintBlock | None = None
        self.lr: float | None = None
        self.updates: dict[int, np.ndarray] = {}  # site -> W1, b1 of its plaintext update (attacked round)
        self.readouts: dict[int, np.ndarray] = {}  # site -> W1, b1 read out of its ciphertexts without the key
        self.aggregate_update: np.ndarray | None = None  # W1, b1 of the round's aggregate
        self.accepted: list[int] = []
        self._round = -1  # the round in progress
        self.isolate = isolate
        self.chosen: list[int] = []  # the sites of the attacked round
        self._indices = layout.imprint_indices()
        self._decryptor: Any = None

    def attacking(self, round_index: int) -> bool:
        return round_index == self.attack_round

    def sample_sites(self, round_index: int) -> list[int]:
        if self.isolate is not None and self.attacking(round_index):
            return [int(self.isolate)]  # the server decides who takes part; nothing at the sites checks how many
        return super().sample_sites(round_index)

    def begin_round(self, round_index: int, chosen: list[int], lr: float | None = None) -> RoundAcc:
        self._round = round_index
        if self.ramp is not None and self.make_block is not None and round_index >= self.ramp_from \
                and self.attack_round < 0:
            self._ramp(round_index, lr)
        elif self.attacking(round_index):
            self.lr = lr
            if self.make_block is not None:  # None: the honest control, same decoding, no crafted broadcast
                self.block = self.make_block(self.global_flat, lr)
                self.global_flat = craft_block(self.global_flat, self.layout, self.block)
            self.spec.load_into(self.broadcast, self.global_flat)
        self._last = {w: self.layout.take(self.global_flat, w).copy() for w in ("w1", "b1", "w2")}
        if self.attacking(round_index):
            self.chosen = list(chosen)
        return super().begin_round(round_index, chosen, lr)

    def _ramp(self, round_index: int, lr: float | None) -> None:
        """Broadcast the block one guard-sized step closer to the crafted one; attack this round if it arrived."""
        assert self.ramp is not None and self.make_block is not None
        if self._last is None:  # nothing broadcast yet: start from the model as it stands
            self._last = {w: self.layout.take(self.global_flat, w).copy() for w in ("w1", "b1", "w2")}
        if self._target is None:
            self.block = self.make_block(self.global_flat, lr)
            crafted = craft_block(self.global_flat, self.layout, self.block)
            self._target = {w: self.layout.take(crafted, w).copy() for w in ("w1", "b1", "w2")}
        flat = np.array(self.global_flat, dtype=np.float32, copy=True)
        arrived = True
        for which, target in self._target.items():
            step = ramp_step(self._last[which], target, *self.ramp)
            arrived = arrived and bool(np.array_equal(step, target))
            offset, size = getattr(self.layout, which)
            flat[offset:offset + size] = step
        self.global_flat = flat
        self.spec.load_into(self.broadcast, flat)
        self.ramp_rounds += 1
        if arrived:
            self.attack_round, self.lr = round_index, lr

    def receive(self, acc: RoundAcc, site: int, payload: bytes, enc: bytes | None) -> np.ndarray:
        received = super().receive(acc, site, payload, enc)
        if self.attacking(acc.round_index):
            if self.secure == "he":
                self.readouts[site] = self._read_without_key(received, enc)
            else:
                self.updates[site] = np.array(received[self._indices], dtype=np.float64)
        return received

    def apply(self, update: np.ndarray | None, accepted: list[int]) -> bool:
        if self.attacking(self._round) and update is not None:
            self.aggregate_update = np.array(update[self._indices], dtype=np.float64)
            self.accepted = list(accepted)
        return super().apply(update, accepted)

    def _read_without_key(self, plain: np.ndarray, enc: bytes | None) -> np.ndarray:
        """The block's coordinates of one HE upload: ciphertext slots decrypted with the key guessed 0 (keyless
        reading, :func:`attacks.keyless.ciphertext_slots_readout`), divided by the site's count; coordinates
        outside ``fed.he_layers`` travel in plaintext and are read as they are."""
        assert self.he_mask is not None and enc is not None
        mask = self.he_mask
        enc_pos = np.cumsum(mask) - 1
        plain_pos = np.cumsum(~mask) - 1
        info, cts = load_update(self.public_ctx, enc, int(mask.sum()))
        eng = engine_for(self.public_ctx)
        if self._decryptor is None:
            self._decryptor = zero_key_decryptor(eng)
        per = values_per_ciphertext(self.public_ctx)
        half = per // 2
        out = np.empty(len(self._indices), dtype=np.float64)
        cache: dict[int, np.ndarray] = {}
        for k, j in enumerate(self._indices):
            if not mask[j]:
                out[k] = plain[plain_pos[j]]
                continue
            p = int(enc_pos[j])
            c, q = divmod(p, per)
            if c not in cache:  # the site packed values [c per, c per + half) as real parts, the next half as imaginary
                slots = ciphertext_slots_readout(cts[c], eng, self._decryptor)
                cache[c] = np.concatenate([slots.real[:half], slots.imag[:half]])
            out[k] = cache[c][q] / info.count
        return out


# --------------------------------------------------------------------------- the attacker's own simulation


def calibration_images(aux: torch.Tensor, bins: int, seed: int = 0) -> torch.Tensor:
    """The images the bin thresholds are calibrated on: ``aux`` itself when it has one image per bin, else
    ``aux`` repeated with each copy's brightness shifted by a Gaussian kernel's draw.

    The thresholds are quantiles of mean brightness; with fewer images than bins, the quantiles of a
    kernel density estimate (Silverman's bandwidth over the images' mean brightness) spread the bins
    where the attacker's images are dense, rather than capping the bins at the images it has.
    """
    if len(aux) >= bins:
        return aux
    proj = aux.flatten(1).double().mean(dim=1)
    iqr = float(torch.quantile(proj, 0.75) - torch.quantile(proj, 0.25))
    spread = min(float(proj.std()), iqr / 1.34) or float(proj.std()) or 1e-2
    bandwidth = 0.9 * spread * len(aux) ** -0.2
    copies = -(-bins // len(aux))
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randn((copies * len(aux), 1, 1, 1), generator=gen) * bandwidth
    shift[:len(aux)] = 0.0  # the images themselves, then jittered copies
    lo, hi = DEFAULT_VALUE_RANGE  # splitfl's inputs
    return (aux.repeat(copies, 1, 1, 1) + shift.to(aux.dtype)).clamp(lo, hi)


def choose_gain(cfg: RunConfig, model: nn.Module, spec: FlatSpec, layout: BlockLayout, aux: torch.Tensor,
                aux_labels: torch.Tensor, calibration: torch.Tensor, task: Any, gains: Sequence[float],
                residual_scale: float, lr: float, images: int, seed: int = 0) -> tuple[float, dict[float, float]]:
    """The gain that recovers most of the attacker's *own* images through a simulated hospital round.

    The hospital's public code (:class:`Site`) trains a copy of the crafted model for one local epoch
    on ``images`` of the attacker's images with the consortium's settings, DP-SGD included (the gain
    sets how much of a clipped per-sample gradient the block gets; encryption is left out, it changes
    nothing the decoding sees), and the attacker decodes the update it would receive. Returns the best
    gain and the recovered share (best candidate SSIM >= 0.9) for every gain tried.
    """
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(aux), generator=gen)[:images]
    sim_cfg = copy.deepcopy(cfg)
    sim_cfg.fed = dataclasses.replace(cfg.fed, secure="none", model_guard=None)
    data = _TensorDataset(aux[pick], aux_labels[pick])
    rates: dict[float, float] = {}
    base = spec.flatten(model)
    for g in gains:
        block = ImprintBlock.calibrate(calibration, layout.bins, gain=float(g), residual_scale=residual_scale)
        flat = craft_block(base, layout, block)
        trial = copy.deepcopy(model)
        spec.load_into(trial, flat)
        site = Site(0, data, sim_cfg, make_loss(task), torch.device("cpu"))  # type: ignore[arg-type]
        update, _ = site.train(trial, spec, flat, 10_000 + seed, lr)
        candidates = layout.decode(update[layout.imprint_indices()], limit=len(pick))
        if len(candidates) == 0:
            rates[float(g)] = 0.0
            continue
        best = pairwise_ssim(aux[pick], candidates).max(dim=1).values
        rates[float(g)] = float((best >= RECOVERED_SSIM).float().mean())
    best_gain = max(rates, key=lambda g: (rates[g], -abs(math.log10(g) + 2)))
    return best_gain, rates


class _TensorDataset(torch.utils.data.Dataset):
    """(image, label) pairs from tensors: the attacker's images in the shape a Site reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


# --------------------------------------------------------------------------- data: hospitals, attacker, evaluator


@dataclass
class _Data:
    splits: DataSplits  # what the hospitals train on (the config's data, capped to the sites' images)
    sites: list[ArrayDataset]
    aux: torch.Tensor  # the attacker's images: validation split + training images no hospital holds
    aux_labels: torch.Tensor
    outside: torch.Tensor  # the evaluator's distractors (test split)


def _load(cfg: RunConfig, distractors: int | None) -> _Data:
    full = load_splits(dataclasses.replace(cfg.data, max_train=None))
    splits = cap_train(full, cfg.data.max_train, cfg.data.seed)
    if len(splits.train) < (cfg.data.max_train or 0):
        raise RunError(f"{cfg.data.flag if cfg.data.source == 'medmnist' else cfg.data.source}: only "
                       f"{len(splits.train)} training images for {cfg.data.max_train} at the hospitals")
    sites = partition_dataset(splits.train, cfg.data.partition)
    rest: list[int] = []
    if len(full.train) > len(splits.train):  # the training images no hospital holds (cap_train's complement)
        keep = set(stratified_subset(full.train.single_labels(), int(cfg.data.max_train), cfg.data.seed).tolist())
        rest = [i for i in range(len(full.train)) if i not in keep]
    aux = torch.cat([full.train._x[rest], full.val._x])
    aux_labels = torch.cat([full.train._y[rest], full.val._y])
    n_out = len(full.test) if distractors is None else min(int(distractors), len(full.test))
    outside = full.test._x[:n_out]
    if len(outside) < MIN_DISTRACTORS:
        raise RunError(f"the test split gives {len(outside)} distractors; the re-identification pool needs {MIN_DISTRACTORS}")
    return _Data(splits, sites, aux, aux_labels, outside)


# --------------------------------------------------------------------------- scoring


def _score(recs: list[Reconstruction], data: _Data, margin: float) -> dict[str, Any]:
    """Per view: leakage rate with the harness' chance level, and a chance level for scoring K candidates.

    Reconstructions are at most as many as the images behind each message (the attacker keeps the bins
    with the largest gaps), paired one-to-one by Hungarian assignment as the harness does. The harness'
    chance (``chance_i`` = 1/pool for a sharp reconstruction) is per paired image; because the pairing
    chooses among K candidates, ``chance_any_candidate`` also reports the bound where each of the K
    could have landed on the image by luck (min(1, K x chance_i)), with its p-value.
    """
    mean_image = torch.cat([s._x for s in data.sites]).float().mean(dim=0)
    rows: list[dict[str, Any]] = []
    pairs_by_view: dict[str, list[Any]] = {}
    for rec in recs:
        behind = rec.originals()
        if not behind:
            continue
        originals = torch.stack([data.sites[s][i][0] for s, i in behind])
        involved = sorted({s for s, _ in behind})
        pool = torch.cat([distractor_pool(data.sites[s]._x, [i for t, i in behind if t == s], data.outside[:0])
                          for s in involved] + [data.outside])
        if len(rec.images):
            scored, paired = score_observation(rec.images, originals, [i for _, i in behind], pool, mean_image,
                                               rec.label, margin)
        else:  # nothing came back (refused, or no bin held a signal): no image is leaked
            scored, paired = _unmatched(rec.label, [i for _, i in behind]), torch.zeros_like(originals)
        k = len(rec.images)
        for s in scored:
            row = s.as_dict()
            row.update(view=rec.view, candidates=k, pool=len(pool) + len(originals),
                       chance_any_candidate=min(1.0, k * float(s.chance)))
            rows.append(row)
        pairs_by_view.setdefault(rec.view, []).append((originals, paired, rec.label))
    views: dict[str, Any] = {}
    for view in dict.fromkeys(r.view for r in recs):
        mine = [r for r in rows if r["view"] == view]
        ok = [r for r in mine if not math.isnan(r["ssim"])]
        leaked = sum(bool(r["leaked"]) for r in mine)
        any_c = chance_summary([r["chance_any_candidate"] for r in mine], leaked)
        views[view] = {
            "images": len(mine),
            "candidates": int(sum(len(r.images) for r in recs if r.view == view)),
            "leakage_rate": leaked / len(mine) if mine else 0.0,
            **chance_summary([r["chance"] for r in mine], leaked),
            "chance_leakage_rate_any_candidate": any_c["chance_leakage_rate"],
            "chance_p_value_any_candidate": any_c["chance_p_value"],
            "reidentified_rate": float(np.mean([r["reidentified"] for r in mine])) if mine else 0.0,
            "ssim_mean": float(np.mean([r["ssim"] for r in ok])) if ok else None,
            "psnr_mean": float(np.mean([r["psnr"] for r in ok])) if ok else None,
            "mean_image_ssim_mean": float(np.mean([r["mean_ssim"] for r in ok])) if ok else None,
            "pool_size_min": int(min(r["pool"] for r in mine)) if mine else 0,
        }
        views[view].update(_curves(mine))
    return {"views": views, "rows": rows, "pairs_by_view": pairs_by_view}


def _curves(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return curves([ScoredImage(**{k: r[k] for k in ScoredImage.__dataclass_fields__}) for r in rows])


def _unmatched(label: str, indices: list[int]) -> list[ScoredImage]:
    nan = float("nan")
    return [ScoredImage(label, int(i), nan, nan, nan, nan, False, False) for i in indices]


# --------------------------------------------------------------------------- the run


def _used(site: Site) -> list[int]:
    """The hospital's evaluation key: which of its images the last round used (each once)."""
    return sorted({i for batch in site.last_batches for i in batch})


def _slug(view: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in view).strip("_")


def run_imprint_attack(cfg: RunConfig, regime: str, batch_size: int, out_dir: str | Path,
                       settings: ImprintSettings | None = None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train a federation whose server is malicious, attack the crafted round, score it; returns a JSON-able summary.

    ``cfg`` is the consortium's run config (data, model, optimizer, learning rate); :func:`malicious_config`
    puts its model behind the imprint block and sets ``regime`` (``fedavg``, ``fedavg+dp``, ``fedavg+he``),
    the batch size and the hospitals' data (``settings.local_steps`` batches each, one local epoch per round).
    The hospitals' training is :class:`FedRunner` and :class:`Site` as shipped; the server is
    :class:`MaliciousFedServer`. Writes ``out_dir/leakage.json``, ``out_dir/montage.png`` (the headline
    view) and ``out_dir/montage_<view>.png``; the run's keys (HE) under ``out_dir/run``.
    """
    settings = settings or ImprintSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with torch_threads(settings.threads):
        probe = malicious_config(cfg, regime, batch_size, settings)
        data = _load(probe, settings.distractors)
        per_site = _images_per_site(settings, batch_size)
        n_sites = probe.data.partition.num_sites
        behind = per_site * n_sites if regime == "fedavg+he" else per_site
        task = data.splits.task
        shape = (task.n_channels, probe.data.size, probe.data.size)
        bins = int(settings.bins or max(64, min(16 * behind, MAX_BLOCK_WEIGHTS // math.prod(shape))))
        run_cfg = malicious_config(cfg, regime, batch_size, settings, bins=bins)
        calibration = calibration_images(data.aux, bins, seed=run_cfg.seed)
        fabric = make_fabric(run_cfg.train)
        fabric.seed_everything(run_cfg.seed, verbose=False)
        runner = FedRunner(fabric, run_cfg, data.splits, out / "run")
        layout = BlockLayout.of(runner.spec, shape)
        tuning: dict[str, Any] = {}

        def make_block(global_flat: np.ndarray, lr: float | None) -> ImprintBlock:
            gain = settings.gain
            if gain is None:  # the attacker's own simulation of a hospital's round (its images, public settings)
                model = copy.deepcopy(runner.model)
                runner.spec.load_into(model, global_flat)
                gain, rates = choose_gain(run_cfg, model, runner.spec, layout, data.aux, data.aux_labels, calibration,
                                          task, settings.gains, settings.residual_scale, float(lr or run_cfg.train.lr),
                                          per_site, seed=run_cfg.seed)
                tuning["gain_trials"] = {f"{g:g}": r for g, r in rates.items()}
                log(f"[imprint] gain chosen on the attacker's images: {gain:g} "
                    f"({', '.join(f'{g:g}: {r:.0%}' for g, r in rates.items())})")
            tuning["gain"] = float(gain)
            return ImprintBlock.calibrate(calibration, layout.bins, gain=float(gain),
                                          residual_scale=settings.residual_scale)

        ramp = None
        if settings.ramp is not None:
            if run_cfg.fed.model_guard is None:
                raise RunError("ImprintSettings.ramp walks the block in under fed.model_guard; the hospitals have none set")
            ramp = (float(run_cfg.fed.model_guard), float(settings.ramp))
        if settings.isolate is not None and not 0 <= settings.isolate < n_sites:
            raise RunError(f"isolate={settings.isolate}: there are {n_sites} sites")
        server = MaliciousFedServer(runner.core, runner.spec, runner.model, layout,
                                    None if settings.honest else make_block, settings.attack_round, ramp,
                                    settings.isolate)
        runner.core = server
        refused: str | None = None
        rounds = settings.max_rounds if ramp is not None and not settings.honest else settings.attack_round + 1
        for r in range(rounds):
            try:
                runner.train_epoch(r, f"round {r + 1}")
            except ModelGuardError as exc:  # a hospital refused the broadcast: nothing trained, nothing sent
                refused = str(exc)
                log(f"[imprint] {refused}")
                break
            if r == server.attack_round:
                break
        if server.attack_round < 0:
            refused = refused or f"the ramp did not reach the crafted block within {rounds} rounds"
        round_label = f"round {server.attack_round}"
        recs: list[Reconstruction] = []
        counts = [len(s) for s in runner.sites]
        site_view = VIEW_CIPHERTEXT if run_cfg.fed.secure == "he" else VIEW_SITE
        received = server.readouts if run_cfg.fed.secure == "he" else server.updates
        for s, site in enumerate(runner.sites):
            if server.chosen and s not in server.chosen:  # not sampled in the attacked round: nothing at risk
                continue
            t = time.time()
            if refused is None and s in received:
                images, indices = layout.decode(received[s], limit=counts[s]), _used(site)
            else:  # refused or never received: the site's images were at risk, nothing came back
                images, indices = torch.empty((0, *shape)), list(range(counts[s]))
            recs.append(Reconstruction(f"{round_label} site {s}", site_view, s, indices, images,
                                       seconds=time.time() - t))
        if refused is None and server.aggregate_update is not None:
            t = time.time()
            sources = [(s, i) for s in server.accepted for i in _used(runner.sites[s])]
            images = layout.decode(server.aggregate_update, limit=sum(counts[s] for s in server.accepted))
            recs.append(Reconstruction(f"{round_label} aggregate", VIEW_AGGREGATE, -1, [], images,
                                       seconds=time.time() - t, sources=sources))
        scored = _score(recs, data, settings.margin)
    views = scored["views"]
    server_views = [v for v in views if views[v]["images"]]
    headline = max(server_views, key=lambda v: (views[v]["leakage_rate"], views[v]["ssim_mean"] or -1.0))
    montages: dict[str, str] = {}
    mode = "honest server (control)" if settings.honest else "malicious server"
    for view, pairs in scored["pairs_by_view"].items():
        title = (f"imprint, {mode}: {regime}, batch {batch_size} x {settings.local_steps} steps, {view}: "
                 f"leakage {views[view]['leakage_rate']:.0%}")
        montages[view] = str(plot_montage(pairs, out / f"montage_{_slug(view)}.png", title, settings.montage_images))
    montage = str(plot_montage(scored["pairs_by_view"][headline], out / "montage.png",
                               f"imprint, {mode}: {regime}, batch {batch_size}, {headline}: "
                               f"leakage {views[headline]['leakage_rate']:.0%}", settings.montage_images))
    fed = run_cfg.fed
    summary: dict[str, Any] = {
        "attack": "imprint module (Fowl et al., ICLR 2022), malicious FedAvg server",
        "honest_control": bool(settings.honest),
        "regime": regime,
        "dataset": run_cfg.data.flag if run_cfg.data.source == "medmnist" else f"{run_cfg.data.source}:{run_cfg.data.modality}",
        "image_shape": list(shape),
        "model": run_cfg.model.name,
        "batch_size": int(batch_size),
        "local_steps": int(settings.local_steps),
        "sites": int(n_sites),
        "images_per_site": int(per_site),
        "optimizer": run_cfg.train.optimizer,
        "momentum": run_cfg.train.momentum if run_cfg.train.optimizer == "sgd" else None,
        "lr": server.lr,
        "attack_round": int(server.attack_round),
        "ramp_rounds": int(server.ramp_rounds) if ramp is not None else None,
        "bins": int(layout.bins),
        "attacker_images": len(data.aux),
        "gain": tuning.get("gain"),
        "gain_trials": tuning.get("gain_trials"),
        "residual_scale": float(settings.residual_scale),
        "secure": fed.secure,
        "isolated_site": settings.isolate,
        "dp_noise_multiplier": max((s.noise_multiplier for s in runner.sites), default=0.0) if runner.dp else 0.0,
        "dp_max_grad_norm": fed.dp_max_grad_norm if runner.dp else None,
        "epsilon": max(s.epsilon() for s in runner.sites) if runner.dp else None,
        "model_guard": fed.model_guard,
        "refused": refused,
        "headline_view": headline,
        **{k: views[headline][k] for k in ("leakage_rate", "chance_leakage_rate", "chance_p_value",
                                           "chance_leakage_rate_any_candidate", "chance_p_value_any_candidate",
                                           "reidentified_rate", "ssim_mean", "psnr_mean", "images", "candidates")},
        "views": {v: {k: x for k, x in d.items() if k not in ("leakage_vs_margin", "fraction_above_ssim_cutoff")}
                  for v, d in views.items()},
        "leakage_vs_margin": views[headline]["leakage_vs_margin"],
        "montage": montage,
        "montages": montages,
        "leakage_json": str(out / "leakage.json"),
        "seconds": time.time() - start,
    }
    write_json(out / "leakage.json", {"summary": summary, "images": scored["rows"]})
    log(f"[imprint] {regime} batch {batch_size}: leakage {summary['leakage_rate']:.1%} ({headline}; chance "
        f"{summary['chance_leakage_rate']:.2%}, any-candidate {summary['chance_leakage_rate_any_candidate']:.2%}, "
        f"p {summary['chance_p_value']:.2g}), SSIM {summary['ssim_mean'] if summary['ssim_mean'] is not None else float('nan'):.3f}")
    return summary


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python -m attacks.malicious_fed --config configs/xray/fedavg.yaml --out DIR``: the grid, one folder per run."""
    p = argparse.ArgumentParser(description="Imprint attack by a malicious FedAvg server against splitfl's hospitals.")
    p.add_argument("--config", required=True, type=Path, help="the consortium's run config (YAML), e.g. configs/xray/fedavg.yaml")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--flag", default=None, help="data.flag override (e.g. retinamnist)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an ImprintSettings field, e.g. --set local_steps=1 --set model_guard=0.5 --set honest=true")
    args = p.parse_args(argv)
    tree = yaml.safe_load(args.config.read_text())
    if args.flag:
        tree.setdefault("data", {})["flag"] = args.flag
    cfg = run_config_from_dict(tree)
    fields = {f.name: f for f in dataclasses.fields(ImprintSettings)}
    chosen: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {item}: no such setting; choose from {', '.join(fields)}")
        chosen[key] = yaml.safe_load(value)
    settings = ImprintSettings(**chosen)
    results = []
    for regime in args.regimes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            results.append(run_imprint_attack(cfg, regime, batch, args.out / f"{regime}-b{batch}", settings))
    write_json(args.out / "imprint_summary.json", results)
    return results


if __name__ == "__main__":
    main()
