"""Attacks on the server's view of split learning (``split.transcript``): images from activations, labels from gradients.

What the server held, step by step (:mod:`attacks.transcript`), and what is done with it:

* ``split-plain``: the activations ``activations_in`` in the clear (pooled features or, with
  ``model.cut: stage:N``, spatial maps). Two inversions, both reported:

  - **white-box**: the server knows the architecture and the encoder's public weights (a frozen
    encoder keeps its public initial / pretrained weights), rebuilds it from the run's config and
    seed exactly as the hospitals do, and minimises ``||enc(x) - a||^2 / ||a||^2 + tv * TV(x)`` over
    images ``x`` boxed to the model's input range (Adam, lr x0.1 at 3/8, 5/8, 7/8 of the iterations);
  - **decoder**: a small convolutional decoder ``a -> x`` trained (MSE) on auxiliary images the
    attacker holds that are *not* the hospitals' (the task's validation split), encoded with the
    known encoder, then applied to the observed activations.

* ``split-he``: the activations arrive as CKKS ciphertexts. They are read without the key
  (decryption with the secret key guessed 0, :func:`attacks.keyless.ciphertext_slots_readout`),
  placed into ``(batch, features)`` by the public packing layout of each message, calibrated to
  the activation statistics of the auxiliary data (the reading itself is ~1e19 in scale), and
  inverted with the same two attacks. The plaintext head update ``head_update_in`` is attacked
  too: for an affine layer ``W`` fed by ``a``, ``dL/dW_k = sum_i g_ik a_i`` and
  ``dL/db_k = sum_i g_ik``, so ``dL/dW_k / dL/db_k`` (row with the largest ``|dL/db_k|``) is a
  weighted average of the batch's activations (exact at batch 1); it is inverted white-box and
  with the decoder, one reconstruction per step each.

* **Label leakage** (Li et al. 2021, "Label Leakage and Protection in Two-party Split Learning"):
  from the logit gradients the server receives (``logit_grads_in``, plaintext or ciphertexts read
  without the key), the *norm* attack scores a sample by ``||g_i||`` and the *direction* attack by
  the cosine of ``g_i`` with the gradient of one sample whose label the attacker knows (Li et al.'s
  assumption; that sample is left out of the AUC). Split-he also hands the server a plaintext head
  update whose bias gradient is the batch sum of the logit gradients: every sample of the batch
  is scored with it (exact at batch 1). ROC AUC against the true labels (positive class 1).

The attacker side reads only the transcript and the auxiliary data; the ground truth
(``ground_truth.jsonl``) is read only to label reconstructions for scoring and for the AUCs.
"""
from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

from attacks.keyless import ciphertext_slots_readout, zero_key_decryptor
from attacks.reconstruction import Reconstruction
from splitfl.he.encrypted_head import FullHeadLayout
from splitfl.he.keys import engine_for, load_public_context
from splitfl.he.wire import EncryptedBatch
from splitfl.models import build_split_model
from splitfl.runs.transcript import Transcript, TranscriptError, read_transcript
from splitfl.split.full_server import unpack_ciphertexts
from splitfl.tensors import tensor_from_bytes

WHITEBOX, DECODER = "white-box inversion", "decoder"
VIEW_PLAIN = "activations (plaintext)"
VIEW_KEYLESS = "activation ciphertexts read without the key"
VIEW_HEAD = "head update (plaintext)"
LOGITS_PLAIN = "logit gradients (plaintext)"
LOGITS_KEYLESS = "logit-gradient ciphertexts read without the key"


# ----------------------------------------------------------------------------- what the attacker knows


def known_encoder(cfg: Any, num_outputs: int, n_channels: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The encoder as the hospitals built it (same config and seed: public initial or pretrained weights), eval mode."""

    torch.manual_seed(cfg.seed)  # splitfl.train.run_split seeds everything right before SplitRunner builds the model
    model, _ = build_split_model(cfg.model, num_outputs, n_channels, cfg.data.size)
    encoder = model.encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, tuple(int(d) for d in model.feature_dim)


def _kind(transcript: Transcript, step: int, kind: str, layer: int) -> Optional[bytes]:
    """A message of one step; an MLP head's messages carry a ``layer{l}_`` prefix."""
    kinds = transcript.steps.get(step, {})
    return kinds.get(kind, kinds.get(f"layer{layer}_{kind}"))


def _parts(transcript: Transcript, step: int, kind: str, layer: int) -> list[bytes]:
    """Every message of that kind in the step, in order (a batch above the packed capacity travels in parts)."""
    return transcript.messages(step, kind) or transcript.messages(step, f"layer{layer}_{kind}")


def recorded_steps(transcript: Transcript) -> list[int]:
    return sorted(s for s in transcript.steps if _kind(transcript, s, "activations_in", 0) is not None)


class KeylessReader:
    """Reads split-he messages as the server can: the public context, a zero secret key, the packing layout."""

    def __init__(self, public_context: bytes) -> None:
        self.ctx = load_public_context(public_context)
        self.engine = engine_for(self.ctx)
        self.decryptor = zero_key_decryptor(self.engine)

    def _slots(self, enc: Any, what: str) -> np.ndarray:
        cts = [self.engine.load_ciphertext(p, f"{what} ciphertext #{i}") for i, p in enumerate(enc.payloads)]
        return np.stack([ciphertext_slots_readout(ct, self.engine, self.decryptor) for ct in cts])

    def activations(self, payload: bytes) -> torch.Tensor:
        """(batch, in_features): every slot put back where the hospital's packing put that (sample, feature)."""

        enc = EncryptedBatch.from_bytes(self.ctx, payload, expect_kind="activations")
        return torch.from_numpy(enc.layout.unpack_activation_grads(self._slots(enc, "activation"), enc.batch)).float()

    def full_layout(self, meta: dict[str, Any]) -> Any:
        """split-he-full's public slot layout (the head's shape and batch capacity are in the run's config)."""

        return FullHeadLayout(int(meta["in_features"]), int(meta["num_classes"]), int(meta["batch_size"]),
                              self.engine.slots)

    def _full_slots(self, payload: bytes, count: int, what: str) -> np.ndarray:
        cts = [self.engine.load_ciphertext(c, f"{what} ciphertext #{i}")
               for i, c in enumerate(unpack_ciphertexts(payload, count, what))]
        return np.stack([np.real(ciphertext_slots_readout(ct, self.engine, self.decryptor)) for ct in cts])

    def full_activations(self, payload: bytes, meta: dict[str, Any]) -> torch.Tensor:
        """split-he-full: (batch capacity, in_features), every sample's slots as the public layout places them."""
        lay = self.full_layout(meta)
        slots = self._full_slots(payload, lay.n_blocks, "activation")
        return torch.from_numpy(lay.unpack_activation_grads(slots, lay.batch_size)).float()

    def full_logit_grads(self, payload: bytes, meta: dict[str, Any], input_grad: bool | None = None) -> torch.Tensor:
        """split-he-full: (batch capacity, num_classes) read at each sample's first feature slot.

        With ``input_grad`` the message opens with ``enc(B G)`` (class pairs as real and minus imaginary
        parts); without it, it holds the batch's update alone, whose first ciphertexts are read the same way
        (a per-sample label is not in it even in plaintext). ``None``: told by the message's ciphertext count.
        """
        lay = self.full_layout(meta)
        if input_grad is None:
            input_grad = len(payload) >= 8 and struct.unpack_from("<I", payload, 4)[0] == lay.backward_count(True)
        cts = [self.engine.load_ciphertext(c, f"backward ciphertext #{i}")
               for i, c in enumerate(unpack_ciphertexts(payload, lay.backward_count(input_grad), "backward message"))]
        slots = np.stack([ciphertext_slots_readout(ct, self.engine, self.decryptor) for ct in cts[: lay.pairs]])
        f, b = lay.features_per_block, lay.batch_size
        per_sample = slots[:, : b * f: f]  # (pairs, B) complex
        return torch.from_numpy(lay._unpaired(per_sample.real - 1j * per_sample.imag).T.copy()).float()

    def logit_grads(self, payload: bytes) -> torch.Tensor:
        """(batch, num_classes): the first feature position of each class's tiled ciphertext."""

        enc = EncryptedBatch.from_bytes(self.ctx, payload, expect_kind="logit_grads")
        slots = self._slots(enc, "logit-gradient")
        return torch.from_numpy(enc.layout._unpairs(slots[:, : enc.layout.rows].T, enc.batch)).float()


# ----------------------------------------------------------------------------- the two inversions


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Per-image anisotropic total variation (mean absolute neighbour difference)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1) + (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)


def whitebox_inversion(encoder: nn.Module, targets: torch.Tensor, image_shape: tuple[int, ...], iterations: int = 300,
                       lr: float = 0.1, tv_weight: float = 1e-3, seed: int = 0, bounds: tuple[float, float] = (-1.0, 1.0),
                       chunk: int = 64) -> torch.Tensor:
    """Images whose encoding matches ``targets`` (N, *feature_shape): batched Adam, boxed to ``bounds``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    milestones = [max(1, int(iterations * f)) for f in (3 / 8, 5 / 8, 7 / 8)]
    for start in range(0, len(targets), chunk):
        a = targets[start : start + chunk].float()
        scale = a.flatten(1).pow(2).mean(1).clamp_min(1e-12)
        x = (0.1 * torch.randn((len(a), *image_shape), generator=gen)).clamp(*bounds).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            match = (encoder(x) - a).flatten(1).pow(2).mean(1) / scale
            (match + tv_weight * _tv(x)).sum().backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(*bounds)
        out.append(x.detach())
    return torch.cat(out) if out else torch.empty((0, *image_shape))


class InverseDecoder(nn.Module):
    """Activations (flat or spatial) -> image: standardise, (linear to a 1/4-size map), upsample, three 3x3 convs."""

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, ...], mean: torch.Tensor,
                 std: torch.Tensor, width: int = 64, bounds: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_hw, self.bounds = (h, w), bounds
        self.register_buffer("mean", mean.reshape(1, *feature_shape).clone())
        self.register_buffer("std", std.reshape(1, *feature_shape).clone().clamp_min(1e-6))
        if len(feature_shape) == 1:
            self.start = (width, max(1, h // 4), max(1, w // 4))
            self.inp = nn.Linear(feature_shape[0], math.prod(self.start))
        else:
            self.start = None
            self.inp = nn.Conv2d(feature_shape[0], width, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, c, 3, padding=1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = self.inp((a - self.mean) / self.std)
        if self.start is not None:
            z = z.view(len(a), *self.start)
        z = F.interpolate(z, size=self.image_hw, mode="bilinear", align_corners=False)
        lo, hi = self.bounds
        return lo + (hi - lo) * torch.sigmoid(self.body(z))


def encode(encoder: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encoder(images[i : i + batch]) for i in range(0, len(images), batch)])


def train_decoder(encoder: nn.Module, aux_images: torch.Tensor, feature_shape: tuple[int, ...], epochs: int = 30,
                  lr: float = 1e-3, seed: int = 0, batch: int = 32) -> InverseDecoder:
    """Fit an :class:`InverseDecoder` on the attacker's own images (MSE), encoded with the known encoder."""
    torch.manual_seed(seed)
    feats = encode(encoder, aux_images)
    decoder = InverseDecoder(feature_shape, tuple(aux_images.shape[1:]), feats.mean(0), feats.std(0))
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(aux_images), generator=gen).split(batch):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(decoder(feats[idx]), aux_images[idx]).backward()
            opt.step()
    return decoder.eval()


def calibrate(reading: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Map a keyless reading onto the activations' scale: standardise it, then per-feature aux mean and std."""
    z = (reading.double() - reading.double().mean()) / (reading.double().std() + 1e-30)
    return (z.float() * std + mean)


def head_update_estimates(flat: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Activation estimate from the first affine layer's block [dW | db]: dW_k / db_k for the row of largest |db_k|."""
    block = flat[: out_features * (in_features + 1)].view(out_features, in_features + 1).double()
    k = int(block[:, in_features].abs().argmax())
    return (block[k, :in_features] / block[k, in_features]).float()


# ----------------------------------------------------------------------------- the harness's entry points


@dataclass
class _Batch:
    step: int
    site: int
    indices: list[int]


def _truth(transcript: Transcript, steps: list[int]) -> list[_Batch]:
    """Evaluation key: which hospital and images each step was (only for labelling the reconstructions)."""
    return [_Batch(s, *transcript.split_truth(s)) for s in steps]


def attack_split(run_dir: Any, settings: Any, data: Any, transcript: Optional[Transcript] = None) -> list[Any]:
    """Reconstructions from every recorded split step, per view and attack (see the module docstring).

    ``transcript``: the run's transcript when the caller has read it already (it holds every payload).
    """

    transcript = transcript if transcript is not None else read_transcript(run_dir / "transcript")
    cfg = transcript.run_config()
    he = cfg.regime in ("split-he", "split-he-full")
    full = cfg.regime == "split-he-full"
    steps = recorded_steps(transcript)[: settings.max_observations]
    if not steps:
        raise TranscriptError(f"{transcript.folder}: no recorded activations (split.transcript_max_steps > 0?)")
    encoder, feature_shape = known_encoder(cfg, data.task.num_outputs, data.task.n_channels)
    which = getattr(settings, "split_attack", "both")
    attacks = [a for a, on in ((WHITEBOX, which in ("whitebox", "both")), (DECODER, which in ("decoder", "both"))) if on]
    if not attacks:
        raise ValueError(f"attack.split_attack={which!r}: choose whitebox, decoder or both")
    aux = data.auxiliary
    if DECODER in attacks or he:
        if aux is None or len(aux) == 0:
            raise TranscriptError("the decoder attack and the keyless calibration need the attacker's auxiliary images")
        aux_feats = encode(encoder, aux)
        aux_mean, aux_std = aux_feats.mean(0), aux_feats.std(0)

    t0 = time.perf_counter()
    if he:
        public = transcript.server_file("server_public_context.bin")
        if public is None:
            raise TranscriptError(f"{transcript.folder}: a split-he run without server_public_context.bin")
        reader = KeylessReader(public)

        def read(p: bytes, s: int) -> torch.Tensor:
            if not full:
                return reader.activations(p)
            n = len(transcript.split_truth(s)[1])  # the batch of the step (its size is public: the slots in use)
            return reader.full_activations(p, transcript.meta)[:n]

        acts = [calibrate(torch.cat([read(p, s) for p in _parts(transcript, s, "activations_in", 0)]),
                          aux_mean, aux_std) for s in steps]
        base = VIEW_KEYLESS
    else:
        acts = [torch.cat([tensor_from_bytes(p, "activations", (None, *feature_shape))
                           for p in _parts(transcript, s, "activations_in", 0)]) for s in steps]
        base = VIEW_PLAIN
    read_seconds = time.perf_counter() - t0
    truth = _truth(transcript, steps)
    sizes = [len(a) for a in acts]
    stacked = torch.cat(acts).view(-1, *feature_shape)
    image_shape = tuple(data.image_shape)
    out = []

    def add(images: torch.Tensor, view: str, seconds: float, per_step_sizes: list[int], batches: list[_Batch]) -> None:
        for b, part in zip(batches, images.split(per_step_sizes)):
            out.append(Reconstruction(f"step {b.step} site {b.site}", view, b.site, b.indices, part,
                                      None, seconds * len(part) / max(len(images), 1)))

    decoder = None
    for attack in attacks:
        start = time.perf_counter()
        if attack == WHITEBOX:
            images = whitebox_inversion(encoder, stacked, image_shape, settings.iterations, settings.lr,
                                        settings.tv_weight, settings.seed)
        else:
            decoder = train_decoder(encoder, aux, feature_shape, getattr(settings, "decoder_epochs", 30),
                                    getattr(settings, "decoder_lr", 1e-3), settings.seed)
            with torch.no_grad():
                images = decoder(stacked)
        add(images, f"{base}: {attack}", time.perf_counter() - start + read_seconds, sizes, truth)

    if he:
        meta_layers = transcript.meta.get("head_layers") or [[transcript.meta["in_features"], data.task.num_outputs]]
        d, k = meta_layers[0]
        size = sum(o * (i + 1) for i, o in meta_layers)
        head_steps = [s for s in steps if transcript.payload(s, "head_update_in") is not None]
        if head_steps:
            start = time.perf_counter()
            est = torch.stack([head_update_estimates(
                tensor_from_bytes(transcript.payload(s, "head_update_in"), "head update", (size,)), d, k)
                for s in head_steps])
            images = whitebox_inversion(encoder, est, image_shape, settings.iterations, settings.lr,
                                        settings.tv_weight, settings.seed + 1)
            add(images, f"{VIEW_HEAD}: {WHITEBOX}", time.perf_counter() - start, [1] * len(head_steps),
                _truth(transcript, head_steps))
            if decoder is not None:  # the same decoder on the estimate
                start = time.perf_counter()
                with torch.no_grad():
                    images = decoder(est)
                add(images, f"{VIEW_HEAD}: {DECODER}", time.perf_counter() - start, [1] * len(head_steps),
                    _truth(transcript, head_steps))
    return out


def _auc(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """ROC AUC of ``scores`` for the ``positive`` flags (torchmetrics), None where one class is absent.

    The scores go in as their average ranks scaled to [0, 1]: AUC depends on the order alone, and
    torchmetrics passes scores outside [0, 1] through a sigmoid, which saturates (every ciphertext read
    without the key has norms ~1e22, all of which would tie at 1.0 and score exactly 0.5).
    """
    if len(scores) < 2 or positive.all() or not positive.any():
        return None
    finite = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    _, tie, counts = np.unique(finite, return_inverse=True, return_counts=True)
    order = np.empty(len(finite))
    order[np.argsort(finite, kind="stable")] = np.arange(len(finite))
    ranks = np.bincount(tie, weights=order)[tie] / counts[tie]  # ties share their average rank
    return float(binary_auroc(torch.from_numpy(ranks / (len(finite) - 1)), torch.from_numpy(positive.astype(np.int64))))


def label_attack_scores(grads: torch.Tensor, reference: int) -> tuple[np.ndarray, np.ndarray]:
    """Li et al.'s scores per sample: the gradient norm, and the cosine with the gradient of sample ``reference``."""
    g = grads.double()
    norms = g.norm(dim=1)
    cos = (g @ g[reference]) / (norms * norms[reference] + 1e-300)
    return norms.numpy(), cos.numpy()


def label_leakage(run_dir: Any, settings: Any, data: Any) -> Optional[dict[str, Any]]:
    """ROC AUCs of the label attacks on every recorded step's logit gradients (and split-he head updates)."""

    if getattr(data.task, "multilabel", False):
        return None
    transcript = read_transcript(run_dir / "transcript")
    cfg = transcript.run_config()
    he = cfg.regime in ("split-he", "split-he-full")
    full = cfg.regime == "split-he-full"
    k = data.task.num_outputs
    steps = recorded_steps(transcript)[: settings.max_observations]
    last = max(len(transcript.meta.get("head_layers") or [[0, 0]]) - 1, 0)
    reader = KeylessReader(transcript.server_file("server_public_context.bin")) if he else None
    grads, labels, head_scores, head_labels = [], [], [], []
    for s in steps:
        site, indices = transcript.split_truth(s)  # evaluation key: the true labels
        y = data.labels(site, indices).reshape(-1).numpy()
        payloads = _parts(transcript, s, "logit_grads_in", last)
        if payloads:
            if full:
                g = torch.cat([reader.full_logit_grads(p, transcript.meta)[: len(y)] for p in payloads])
            else:
                g = torch.cat([reader.logit_grads(p) if he else tensor_from_bytes(p, "logit gradient", (None, k))
                               for p in payloads])
            grads.append(g)
            labels.append(y)
        update = transcript.payload(s, "head_update_in")
        if update is not None:
            layers = transcript.meta.get("head_layers") or [[transcript.meta["in_features"], k]]
            size = sum(o * (i + 1) for i, o in layers)
            flat = tensor_from_bytes(update, "head update", (size,))
            i_last, o_last = layers[-1]
            offset = size - o_last * (i_last + 1)
            db = flat[offset:].view(o_last, i_last + 1)[:, i_last]
            # dL/db_1 = mean_i (p_i1 - y_i1): negative when the batch's samples are of class 1
            head_scores += [float(-db[1 if k > 1 else 0])] * len(y)
            head_labels.append(y)
    out: dict[str, Any] = {"logit_grads_view": None, "norm_auc": None, "direction_auc": None, "n": 0,
                           "head_update_view": None, "head_update_auc": None, "head_update_n": 0}
    if grads:
        g, y = torch.cat(grads), np.concatenate(labels)
        positive = y == 1
        norms, cos = label_attack_scores(g, 0)
        cos = cos if positive[0] else -cos  # the attacker knows sample 0's label (Li et al.'s direction attack)
        out.update(logit_grads_view=LOGITS_KEYLESS if he else LOGITS_PLAIN, norm_auc=_auc(norms, positive),
                   direction_auc=_auc(cos[1:], positive[1:]), n=int(len(y)))
    if head_labels:
        y = np.concatenate(head_labels)
        out.update(head_update_view=f"{VIEW_HEAD}: bias gradient", head_update_auc=_auc(np.array(head_scores), y == 1),
                   head_update_n=int(len(y)))
    return out
