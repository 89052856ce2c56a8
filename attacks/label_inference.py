"""Label inference by a malicious split-learning server that crafts its head.

The hospitals keep their labels and compute the loss, but the logits they compute it on come from the
server's head. A malicious server replaces its head's last affine layer by zeros (weights and bias) and
never updates it: every logit is 0, the softmax is uniform, and the gradient of the hospitals' batch-mean
cross-entropy is, for every sample ``i`` of a batch of ``B``::

    dL/dlogits_i = (1/K - onehot(y_i)) / B

* ``split-plain``: that gradient arrives in plaintext per sample; its one negative entry is the label,
  exactly, whatever the data (an honest head leaks it too, ``p_i - onehot(y_i)``, but the crafted one makes
  it independent of training).
* ``split-he``: per-sample gradients arrive as CKKS ciphertexts (read without the key: noise), but the
  plaintext batch-aggregated head update carries the bias gradient ``db_k = 1/K - n_k / B``, so the server
  recovers each batch's label *counts* ``n_k = B (1/K - db_k)`` exactly (``B`` is public: the message
  header's batch size). Per sample it can do no better than give every sample its batch's majority class,
  which the counts make better than guessing the overall majority class at small batches: both are reported.
  With the hospitals' DP on the head update (``split.dp_*``) the clipping and noise blur the counts.
* ``split-he-full``: the server can still craft its head, replacing ``enc(W)`` by a public-key encryption of
  zero (the hospitals cannot tell), but every message is a ciphertext and no aggregate is in plaintext: the
  keyless reading of ``enc(B G)`` (or, with a frozen encoder, of the encrypted update) is all it has.

Scores (:func:`run_label_inference`): per-sample accuracy against the majority-class rate (the accuracy of
always guessing the most frequent class), with an exact one-sided binomial p-value, and the share of
batches whose counts were recovered exactly.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.config import LabelSettings
from attacks.malicious_split import MaliciousRun, ServerFactory, label_score, majority_rate, malicious_config
from attacks.runtime import torch_threads
from attacks.split_inversion import KeylessReader
from splitfl.artifacts import write_json
from splitfl.config import RunConfig, build_train_parser, instantiate, run_config_from_namespace
from splitfl.config_help import add_field_help
from splitfl.data import load_splits
from splitfl.he.wire import EncryptedBatch
from splitfl.split.full_server import FullSplitServer, unpack_ciphertexts
from splitfl.split.server import SplitServer
from splitfl.tensors import ProtocolError, tensor_from_bytes, tensor_to_bytes
from splitfl.transcript import TranscriptRecorder

PER_SAMPLE_PLAIN = "logit gradients (plaintext): argmin"
PER_SAMPLE_KEYLESS = "logit-gradient ciphertexts read without the key: argmin"
FROM_COUNTS = "head update (plaintext) bias gradient: batch counts, majority per batch"


@dataclass
class Inference:
    """What the server inferred at one step: per-sample labels and/or the batch's label counts."""

    labels: np.ndarray | None = None
    counts: np.ndarray | None = None
    batch: int | None = None


def last_linear(head: nn.Module) -> nn.Linear:
    """The head's output layer (a linear head itself, an MLP's second layer, a stage head's classifier)."""
    if isinstance(head, nn.Linear):
        return head
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ProtocolError(f"a {type(head).__name__} head has no linear output layer to craft")
    return layers[-1]


def craft(head: nn.Module) -> None:
    """Zero the output layer: every logit is 0 whatever the activations, the softmax uniform."""
    out = last_linear(head)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()


def counts_from_bias_gradient(db: torch.Tensor, batch: int) -> np.ndarray:
    """``n_k = B (1/K - db_k)``, rounded: exact under the crafted head without DP."""
    k = len(db)
    return np.rint(batch * (1.0 / k - db.double().numpy())).astype(np.int64)


class LabelServer(SplitServer):
    """split-plain / split-he with the crafted head (kept fixed: it never takes an optimizer step)."""

    def __init__(self, settings: LabelSettings, head: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any | None, mode: str, public_context: bytes | None = None, batch_capacity: int = 64,
                 recorder: TranscriptRecorder | None = None, feature_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None) -> None:
        if settings.craft_head:
            craft(head)
        super().__init__(head, optimizer, scheduler, mode, public_context, batch_capacity, recorder,  # type: ignore[arg-type]
                         feature_shape, num_classes)
        self.settings = settings
        self.reader = KeylessReader(public_context) if mode == "he" and public_context is not None else None
        self.inferred: dict[int, Inference] = {}
        self.step = 0  # training steps seen (the recorder's step numbering)

    def _now(self) -> Inference:
        return self.inferred.setdefault(self.step, Inference())

    def forward(self, payload: bytes, train: bool = True, layer: int = 0) -> bytes:
        if train and layer == 0 and self.mode == "he":  # a batch above the packed capacity travels in parts
            now = self._now()
            now.batch = (now.batch or 0) + EncryptedBatch.from_bytes(self.context, payload, expect_kind="activations").batch
        return super().forward(payload, train, layer)

    def backward(self, payload: bytes, layer: int | None = None) -> bytes:
        last = max(len(self.layers) - 1, 0)
        layer = last if layer is None else layer
        if self.mode == "he":
            if layer == last:  # per-sample gradients, as ciphertexts: the keyless reading is all there is
                now, read = self._now(), self.reader.logit_grads(payload).argmin(dim=1).numpy()
                now.labels = read if now.labels is None else np.concatenate([now.labels, read])
            return super().backward(payload, layer)  # G @ W on ciphertexts (W crafted: enc(0))
        self._record("logit_grads_in", payload, True, layer)
        if self._saved is None:
            raise ProtocolError("backward without a preceding training forward")
        x, out = self._saved
        g = tensor_from_bytes(payload, "logit gradient", tuple(out.shape))
        self._now().labels = g.argmin(dim=1).numpy()
        self.optimizer.zero_grad(set_to_none=True)
        out.backward(g)  # dL/dx through the crafted head (zero)
        if not self.settings.craft_head:  # the curious server's head trains; the crafted one never steps
            self.optimizer.step()
        self._saved = None
        reply = tensor_to_bytes(x.grad)
        self._record("activation_grads_out", reply, True, layer)
        self._next()
        return reply

    def apply_update(self, payload: bytes) -> None:
        """split-he: the batch's label counts from the output layer's bias gradient; the crafted head stays."""
        flat = self.read_update(payload)
        out = self.layers[-1]
        db = flat[-out.out_features * (out.in_features + 1):].view(out.out_features, out.in_features + 1)[:, -1]
        now = self._now()
        if now.batch is not None:
            now.counts = counts_from_bias_gradient(db, now.batch)
        if not self.settings.craft_head:  # the curious server's head trains as the protocol says
            self.step_head(flat)
        self._next()

    def _next(self) -> None:
        self.step += 1
        if self.recorder is not None:
            self.recorder.next_step()


class LabelFullServer(FullSplitServer):
    """split-he-full: ``enc(W)`` replaced by public-key encryptions of zero, kept so; reads ``enc(B G)`` keylessly."""

    def __init__(self, settings: LabelSettings, public_context: bytes, in_features: int, num_classes: int,
                 batch_capacity: int, initial_weights: bytes, refresh_every: int,
                 recorder: TranscriptRecorder | None = None) -> None:
        super().__init__(public_context, in_features, num_classes, batch_capacity, initial_weights, refresh_every,
                         recorder)
        self.settings = settings
        self.reader = KeylessReader(public_context)
        self.meta = {"in_features": in_features, "num_classes": num_classes, "batch_size": batch_capacity}
        self.inferred: dict[int, Inference] = {}
        self.step = 0
        if settings.craft_head:
            self._zero_head()

    def _zero_head(self) -> None:
        """enc(0) at the weights' level and scale, made with the public key: the crafted head, under encryption."""
        eng = self.head.eng
        self.head.weights = [[eng.encrypt_zero(ct.parms_id(), ct.scale) for ct in row] for row in self.head.weights]

    def backward(self, payload: bytes, input_grad: bool) -> bytes | None:
        unpack_ciphertexts(payload, self.layout.backward_count(input_grad), "backward message")  # the honest check first
        grads = self.reader.full_logit_grads(payload, self.meta, input_grad)
        self.inferred[self.step] = Inference(labels=grads.argmin(dim=1).numpy())
        reply = super().backward(payload, input_grad)  # enc(W) steps on ciphertexts; enc(dL/dx) = enc(G) enc(0)
        if self.settings.craft_head:
            self._zero_head()
        self.step += 1
        return reply


def label_factory(settings: LabelSettings, cfg: RunConfig) -> ServerFactory:
    """The server factory :class:`splitfl.split.runner.SplitRunner` calls, giving crafted-head servers."""

    def make(head: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None, mode: str,
             public_context: bytes | None = None, batch_capacity: int = 64,
             recorder: TranscriptRecorder | None = None, initial_weights: bytes | None = None,
             **shapes: Any) -> Any:
        if mode == "he-full":
            lin = last_linear(head)
            return LabelFullServer(settings, public_context, lin.in_features, lin.out_features,  # type: ignore[arg-type]
                                   batch_capacity, initial_weights, cfg.split.full_refresh_every, recorder)  # type: ignore[arg-type]
        return LabelServer(settings, head, optimizer, scheduler, mode, public_context, batch_capacity, recorder, **shapes)

    return make


# ----------------------------------------------------------------------------- the run


def _batch_majority(counts: np.ndarray, batch: int) -> np.ndarray:
    """Every sample of the batch gets the class the counts say is most frequent (ties: the lower class)."""
    return np.full(batch, int(np.argmax(counts)), dtype=np.int64)


def run_label_inference(cfg: RunConfig, out_dir: str | Path, settings: LabelSettings | None = None,
                        regime: str | None = None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """One epoch of the hospitals' real code against the crafted-head server; labels scored over the first steps.

    Writes ``out_dir/labels.json`` (and the run under ``out_dir/run``); returns its content (JSON-able):
    ``per_sample`` (per-sample messages: accuracy, chance = majority-class rate, binomial p-value),
    ``counts`` (batches whose label counts were recovered exactly), ``from_counts`` (per-sample accuracy of
    the batch-majority guess the counts allow), and the headline ``label_accuracy`` / ``chance`` / ``p_value``
    of the strongest of them.
    """
    settings = settings or LabelSettings()
    cfg = malicious_config(cfg, regime)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    with torch_threads(1):
        run = MaliciousRun(cfg, out_dir / "run", label_factory(settings, cfg), load_splits(cfg.data))
        run.train(1, settings.observations, log)
    truth = run.truth()
    k = run.runner.task.num_outputs
    server = run.server
    true_all, per_sample, from_counts, count_rows = [], [], [], []
    for step, (site, indices) in sorted(truth.items()):
        y = run.sites[site]._y[indices].numpy().reshape(-1).astype(np.int64)
        true_all.append(y)
        inf = server.inferred.get(step, Inference())
        if inf.labels is not None:
            per_sample.append((inf.labels[: len(y)].astype(np.int64), y))
        if inf.counts is not None:
            true_counts = np.bincount(y, minlength=k)
            count_rows.append({"step": step, "true": true_counts.tolist(), "inferred": inf.counts.tolist(),
                               "exact": bool((inf.counts == true_counts).all())})
            from_counts.append((_batch_majority(inf.counts, len(y)), y))
    y_all = np.concatenate(true_all) if true_all else np.zeros(0, dtype=np.int64)
    chance = majority_rate(y_all, k) if len(y_all) else 0.0

    def scored(pairs: list[tuple[np.ndarray, np.ndarray]], view: str) -> dict[str, Any] | None:
        if not pairs:
            return None
        pred, true = np.concatenate([p for p, _ in pairs]), np.concatenate([t for _, t in pairs])
        return {"view": view, **label_score(pred, true, chance)}

    result: dict[str, Any] = {
        "attack": "label_inference", "regime": cfg.regime, "model": cfg.model.name, "cut": cfg.model.cut,
        "craft_head": settings.craft_head, "encoder_trainable": run.runner.encoder_trainable,
        "batch_size": cfg.train.batch_size, "num_classes": k, "steps": len(truth), "samples": len(y_all),
        "chance": chance,
        "per_sample": scored(per_sample, PER_SAMPLE_KEYLESS if cfg.regime != "split-plain" else PER_SAMPLE_PLAIN),
        "from_counts": scored(from_counts, FROM_COUNTS),
        "counts": ({"batches": len(count_rows), "exact_batches": sum(r["exact"] for r in count_rows),
                    "exact_rate": sum(r["exact"] for r in count_rows) / len(count_rows),
                    "mean_abs_error": float(np.mean([np.abs(np.subtract(r["inferred"], r["true"])).sum()
                                                     for r in count_rows])),
                    "per_step": count_rows} if count_rows else None),
    }
    views = [v for v in (result["per_sample"], result["from_counts"]) if v is not None]
    best = max(views, key=lambda v: v["accuracy"]) if views else None
    result.update(label_accuracy=best["accuracy"] if best else None, p_value=best["p_value"] if best else 1.0,
                  strongest_view=best["view"] if best else None, seconds=time.perf_counter() - t0)
    write_json(out_dir / "labels.json", result)
    counts = result["counts"]
    log(f"[labels {cfg.regime}] {result['samples']} samples, chance {chance:.1%}: "
        + "; ".join(f"{v['view']}: {v['accuracy']:.1%} (p {v['p_value']:.3g})" for v in views)
        + (f"; counts exact in {counts['exact_batches']}/{counts['batches']} batches" if counts else "; no counts"))
    return result


def build_parser() -> Any:
    """``python -m attacks.label_inference``: a run config (``splitfl train``'s keys) plus ``--labels.*``."""
    parser = build_train_parser()
    parser.description = ("Label inference by a malicious split server with a crafted (zero) head: one epoch of the "
                          "hospitals' real code; writes OUT/labels.json")
    parser.add_class_arguments(LabelSettings, "labels")
    add_field_help(parser, LabelSettings, "labels.")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    ns = instantiate(parser, parser.parse_args(argv))
    return run_label_inference(run_config_from_namespace(ns), ns.out, ns.labels)


if __name__ == "__main__":
    main()
