"""Encrypted linear head of the split-HE protocol: batch-packed forward and backward.

Hospital: :meth:`PackedLinearHE.encrypt_activations` -> server:
:meth:`~PackedLinearHE.forward` (weights and bias in plaintext, activations
encrypted) -> hospital: :meth:`~PackedLinearHE.decrypt_logits`. For encoder
fine-tuning: :meth:`~PackedLinearHE.encrypt_logit_grads` -> server:
:meth:`~PackedLinearHE.backward_input` -> hospital:
:meth:`~PackedLinearHE.decrypt_activation_grads` (= dL/dx = G @ W).

The slot layout is :class:`~splitfl.he.packing.PackedLayout`. The server
evaluates each output as a sum of ciphertext x plaintext products followed
by a single rescale; the plaintexts (weights repeated per row) are encoded
once per weight version and shared by forward and backward. Every input is
checked before anything is computed or cached, and the weight tensors are
only read, so a rejected message changes nothing on the server.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa
import torch

from .keys import SealEngine, engine_for
from .packing import PackedLayout
from .parallel import CKKSWorkers, cached_plaintexts, digest
from .params import HEError, check_depth, max_abs_value
from .wire import EncryptedBatch, check_message_shape

__all__ = ["PackedLinearHE", "DEFAULT_GAIN_BITS"]

# Without an explicit value_bound the hospital accepts |values| up to
# max_abs_value / 2**DEFAULT_GAIN_BITS, so the server may apply weights whose
# absolute sums into one slot reach 2**6 = 64 (4096 and 64 for the default set).
DEFAULT_GAIN_BITS = 6
_CACHE_VERSIONS = 2  # current and previous weight version


# Weight plaintexts of one weight version: [class][block], None where the block is all zero.
_Encoded = list[list[Optional[sa.Plaintext]]]


def sum_of_products(
    ev: sa.Evaluator, pairs: Iterable[tuple[sa.Ciphertext, Optional[sa.Plaintext]]]
) -> Optional[sa.Ciphertext]:
    """sum ct * pt over the pairs, before any rescale; None when no term is left.

    Pairs whose plaintext is None (all zero) are skipped, and so are products
    SEAL refuses as "transparent" (identically zero: they would decrypt without
    the key), so the caller decides what an empty sum becomes.
    """
    acc: Optional[sa.Ciphertext] = None
    term = sa.Ciphertext()
    for ct, pt in pairs:
        if pt is None:
            continue
        try:
            ev.multiply_plain(ct, pt, term)
        except (RuntimeError, ValueError) as e:
            if "transparent" in str(e):
                continue
            raise
        if acc is None:
            acc, term = term, sa.Ciphertext()
        else:
            ev.add_inplace(acc, term)
    return acc


def check_ciphertext(eng: SealEngine, ct: sa.Ciphertext, parms_id: list, what: str, stage: str) -> None:
    """HEError unless ``ct`` has two polynomials at ``parms_id`` and the context's scale (``stage`` says which)."""
    if ct.parms_id() != parms_id or ct.size() != 2 or not math.isclose(ct.scale, eng.scale, rel_tol=1e-9):
        raise HEError(
            f"{what} is at the wrong level or scale (size {ct.size()}, scale 2^{math.log2(ct.scale):.2f}); "
            f"expected {stage} at scale 2^{eng.params.scale_bits}."
        )


def check_fresh(eng: SealEngine, ct: sa.Ciphertext, what: str) -> None:
    check_ciphertext(eng, ct, eng.first_parms_id, what, "a fresh encryption")


def check_result(eng: SealEngine, ct: sa.Ciphertext, what: str) -> None:
    check_ciphertext(eng, ct, eng.next_parms_id, what, "a result after one rescale")


def rescaled_sum(ev: sa.Evaluator, pairs: Iterable[tuple[sa.Ciphertext, Optional[sa.Plaintext]]]
                 ) -> Optional[sa.Ciphertext]:
    """:func:`sum_of_products` rescaled once; None when no term is left (the caller decides what that becomes)."""
    acc = sum_of_products(ev, pairs)
    if acc is not None:
        ev.rescale_to_next_inplace(acc)
    return acc


def load_ciphertexts(eng: SealEngine, enc: EncryptedBatch, parms_id: list, stage: str) -> list[sa.Ciphertext]:
    """Parse every ciphertext of a batch, refusing any at another level or scale than ``stage`` expects."""
    cts = []
    for i, payload in enumerate(enc.payloads):
        what = f"ciphertext #{i} of the {enc.kind} batch"
        ct = eng.load_ciphertext(payload, what)
        check_ciphertext(eng, ct, parms_id, what, stage)
        cts.append(ct)
    return cts


# ---------------------------------------------------------------------------- the server's work in CKKSWorkers


def _weight_plains(eng: SealEngine, cache: OrderedDict, layout: PackedLayout, w: np.ndarray,
                   classes: range) -> _Encoded:
    """A worker's plaintexts of ``W`` for its ``classes`` ([class - start][block]), encoded once per weight version.

    Forward and backward split the work by the same classes, so each worker encodes its rows once per version.
    """

    def make() -> _Encoded:
        scale = float(eng.data_primes[-1])
        part = layout.weight_blocks(w)[classes.start:classes.stop]
        return [[eng.encode(row, eng.first_parms_id, scale) if np.any(row != 0) else None for row in per_class]
                for per_class in part]

    return cached_plaintexts(cache, ("packed-linear", digest(w), classes.start, classes.stop), make)


def _load_fresh(eng: SealEngine, payloads: Sequence[bytes], kind: str) -> list[sa.Ciphertext]:
    cts = []
    for i, data in enumerate(payloads):
        what = f"ciphertext #{i} of the {kind} batch"
        ct = eng.load_ciphertext(data, what)
        check_fresh(eng, ct, what)
        cts.append(ct)
    return cts


def _forward_part(eng: SealEngine, cache: OrderedDict, layout: PackedLayout, w: np.ndarray, classes: range,
                  payloads: list[bytes]) -> list[Optional[bytes]]:
    """The logits ciphertexts of ``classes``: sum over blocks of x_c * W_kc, rescaled (None where no term is left)."""
    cts = _load_fresh(eng, payloads, "activations")
    plains = _weight_plains(eng, cache, layout, w, classes)
    return [_saved(eng, rescaled_sum(eng.evaluator, zip(cts, per_class))) for per_class in plains]


def _backward_part(eng: SealEngine, cache: OrderedDict, layout: PackedLayout, w: np.ndarray, classes: range,
                   payloads: list[bytes]) -> list[Optional[bytes]]:
    """Every block's partial G @ W over ``classes``: sum over them of G_k * W_kc, rescaled (None: no term)."""
    cts = _load_fresh(eng, payloads, "logit_grads")
    plains = _weight_plains(eng, cache, layout, w, classes)
    return [_saved(eng, rescaled_sum(eng.evaluator, zip(cts, [per_class[c] for per_class in plains])))
            for c in range(layout.n_blocks)]


def _saved(eng: SealEngine, ct: Optional[sa.Ciphertext]) -> Optional[bytes]:
    return None if ct is None else eng.save(ct)


class PackedLinearHE:
    """Batch-packed CKKS evaluation of ``x @ W.T + b`` and of ``G @ W`` for one head shape.

    ``batch_size`` is the largest batch (the last, smaller batch of an epoch
    uses the same layout); ``slots`` must be the context's N/2. ``value_bound``
    is the hospital's bound on |activations| and |logit gradients|, a public
    constant (never derived from the data); by default max_abs_value / 64.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        batch_size: int,
        slots: int,
        *,
        value_bound: Optional[float] = None,
    ) -> None:
        self.layout = PackedLayout(in_features, num_classes, batch_size, slots)
        if value_bound is not None and not (math.isfinite(value_bound) and value_bound > 0):
            raise HEError(f"PackedLinearHE: value_bound={value_bound!r} must be a positive finite number.")
        self.value_bound = value_bound
        self._cache: "OrderedDict[tuple, _Encoded]" = OrderedDict()
        self._bias_cache: "OrderedDict[tuple, list[sa.Plaintext]]" = OrderedDict()
        self._spare: dict[int, list[sa.Plaintext]] = {}  # per engine: plaintexts of an evicted weight version
        self._lock = threading.Lock()

    @property
    def in_features(self) -> int:
        return self.layout.in_features

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    @property
    def slots(self) -> int:
        return self.layout.slots

    def __repr__(self) -> str:
        lay = self.layout
        return (
            f"PackedLinearHE({lay.in_features}->{lay.num_classes}, batch<={lay.batch_size}, slots={lay.slots}: "
            f"{lay.n_blocks} ciphertext(s) of {lay.features_per_block} features x {lay.rows} row(s))"
        )

    # ------------------------------------------------------------------ checks
    def _engine(self, ctx: ts.Context) -> SealEngine:
        eng = engine_for(ctx)
        if eng.slots != self.layout.slots:
            raise HEError(
                f"{self!r} was built for {self.layout.slots} slots but the context has {eng.slots} "
                f"(N={2 * eng.slots}); build it with slots=params.slots."
            )
        check_depth(eng.params, 1)
        return eng

    def input_bound(self, ctx: ts.Context) -> float:
        """The |value| bound the hospital enforces before encrypting (and declares in each message)."""
        limit = max_abs_value(self._engine(ctx).params)
        if self.value_bound is None:
            return limit / 2**DEFAULT_GAIN_BITS
        if self.value_bound > limit:
            raise HEError(
                f"value_bound={self.value_bound:g} exceeds max_abs_value={limit:g} of "
                f"{self._engine(ctx).params.describe()}: such values would overflow at the output. Lower it or use "
                "parameters with more integer bits."
            )
        return self.value_bound

    def _incoming(self, enc: EncryptedBatch, ctx: Optional[ts.Context], kind: str) -> SealEngine:
        if not isinstance(enc, EncryptedBatch):
            raise HEError(f"Expected an EncryptedBatch of {kind}, got {type(enc).__name__}.")
        if ctx is None:
            raise HEError(
                f"This encrypted {enc.kind} batch has no context; parse received bytes with "
                "EncryptedBatch.from_bytes(ctx, data, ...)."
            )
        if enc.kind != kind:
            raise HEError(f"Expected an encrypted {kind!r} batch, got {enc.kind!r}.")
        if enc.layout != self.layout:
            raise HEError(f"Encrypted {kind} batch was packed for {enc.layout}, but this head uses {self.layout}.")
        eng = self._engine(ctx)
        if enc.fingerprint != eng.fingerprint:
            raise HEError(
                f"Encrypted {kind} batch was made under context {enc.fingerprint[:19]}..., this context is "
                f"{eng.fingerprint[:19]}...: another consortium key or parameter set."
            )
        check_message_shape(self.layout, kind, enc.batch, enc.dim, len(enc.payloads), ctx)
        if not (math.isfinite(enc.value_bound) and enc.value_bound >= 0):
            raise HEError(f"Encrypted {kind} batch declares an invalid value bound {enc.value_bound!r}.")
        return eng

    def _load(self, eng: SealEngine, enc: EncryptedBatch, fresh: bool) -> list[sa.Ciphertext]:
        """Parse every ciphertext and check its level and scale (fresh upload vs rescaled result)."""
        parms_id = eng.first_parms_id if fresh else eng.next_parms_id
        return load_ciphertexts(eng, enc, parms_id, "a fresh encryption" if fresh else "a result after one rescale")

    def _check_range(self, eng: SealEngine, enc: EncryptedBatch, gain: float, extra: float, what: str) -> float:
        """Refuse weights that could push an output slot past max_abs_value; return that (public) bound."""
        limit = max_abs_value(eng.params)
        worst = gain * enc.value_bound + extra
        if worst > limit:
            raise HEError(
                f"{what} could overflow: weights summing to {gain:.4g} per output slot times the hospital's value "
                f"bound {enc.value_bound:g}{f' plus |bias| {extra:.4g}' if extra else ''} gives {worst:.4g} > "
                f"max_abs_value {limit:g} of {eng.params.describe()}. Lower value_bound on the hospital side "
                "(PackedLinearHE(value_bound=...)), keep the head's weights smaller, or use parameters with more "
                "integer bits."
            )
        return limit  # what the reply declares: a constant, so it reveals nothing about the weights

    # ----------------------------------------------------------- hospital side
    def encrypt_activations(self, ctx: ts.Context, x: torch.Tensor,
                            workers: Optional[CKKSWorkers] = None) -> EncryptedBatch:
        """Encrypt a batch of encoder outputs ``x`` (B <= batch_size, in_features) under the secret key."""
        eng = self._engine(ctx)
        bound = self.input_bound(ctx)
        arr = _checked_matrix(x, "activations x", self.layout.in_features, self.layout.batch_size, bound)
        payloads = _encrypt_all(eng, ctx, self.layout.pack_activations(arr), workers)
        return EncryptedBatch(
            "activations", arr.shape[0], arr.shape[1], self.layout, payloads, bound, eng.fingerprint, ctx
        )

    def encrypt_logit_grads(self, ctx: ts.Context, g: torch.Tensor,
                            workers: Optional[CKKSWorkers] = None) -> EncryptedBatch:
        """Encrypt dL/dlogits ``g`` (B, num_classes): one ciphertext per class, tiled over feature positions."""
        eng = self._engine(ctx)
        bound = self.input_bound(ctx)
        arr = _checked_matrix(g, "logit gradients g", self.layout.num_classes, self.layout.batch_size, bound)
        payloads = _encrypt_all(eng, ctx, self.layout.pack_logit_grads(arr), workers)
        return EncryptedBatch(
            "logit_grads", arr.shape[0], arr.shape[1], self.layout, payloads, bound, eng.fingerprint, ctx
        )

    def decrypt_logits(
        self, ctx: ts.Context, enc: EncryptedBatch, *, dtype: Optional[torch.dtype] = None,
        workers: Optional[CKKSWorkers] = None,
    ) -> torch.Tensor:
        """(B, num_classes) logits: decrypt and add up each row's partial sums (bias already added by the server).

        Returned in ``dtype`` (default: torch's default dtype, so autograd mixes
        them with the model); the CKKS result itself is float64 (error ~1e-7).
        """
        eng = self._incoming(enc, ctx, "logits")
        slots = self._decrypt(eng, enc, workers)
        out = torch.from_numpy(self.layout.unpack_logits(slots, enc.batch))
        return out.to(dtype or torch.get_default_dtype())

    def decrypt_activation_grads(
        self, ctx: ts.Context, enc: EncryptedBatch, *, dtype: Optional[torch.dtype] = None,
        workers: Optional[CKKSWorkers] = None,
    ) -> torch.Tensor:
        """(B, in_features) gradient of the loss w.r.t. the activations (G @ W), in ``dtype`` as above."""
        eng = self._incoming(enc, ctx, "activation_grads")
        slots = self._decrypt(eng, enc, workers)
        out = torch.from_numpy(self.layout.unpack_activation_grads(slots, enc.batch))
        return out.to(dtype or torch.get_default_dtype())

    def _decrypt(self, eng: SealEngine, enc: EncryptedBatch, workers: Optional[CKKSWorkers]) -> np.ndarray:
        if workers is None:
            out = np.stack([eng.decrypt(ct) for ct in self._load(eng, enc, fresh=False)])
        else:
            workers.check(enc.context)
            out = workers.decrypt(enc.payloads, f"ciphertext of the {enc.kind} batch", check_result)
        limit = max_abs_value(eng.params)
        peak = float(max(np.abs(out.real).max(), np.abs(out.imag).max()))
        if not peak <= limit:
            raise HEError(
                f"Decrypted {enc.kind} hold |values| up to {peak:.4g} > max_abs_value {limit:g}: the server's result "
                "overflowed (or the message was built wrongly). Lower value_bound or the head's weights."
            )
        return out

    # ------------------------------------------------------------- server side
    def prepare(self, ctx: ts.Context, weight: torch.Tensor) -> None:
        """Encode the plaintexts of a weight version ahead of time (e.g. right after the optimizer step)."""
        eng = self._engine(ctx)
        self._encoded(eng, _checked_weight(weight, self.layout))

    def clear_cache(self) -> None:
        """Forget encoded weight versions (benchmarks use it to time the encoding)."""
        with self._lock:
            self._cache.clear()
            self._bias_cache.clear()
            self._spare.clear()

    def forward(self, enc_x: EncryptedBatch, weight: torch.Tensor, bias: torch.Tensor,
                workers: Optional[CKKSWorkers] = None) -> EncryptedBatch:
        """Encrypted logits x @ W.T + b: one ciphertext per class (partial sums per row, bias in slot 0).

        With ``workers`` each worker computes the logits of a run of classes, whose weight plaintexts it
        encodes and keeps; this process adds the bias.
        """
        ctx = enc_x.context if isinstance(enc_x, EncryptedBatch) else None
        eng = self._incoming(enc_x, ctx, "activations")
        w = _checked_weight(weight, self.layout)
        b = _checked_vector(bias, "bias", self.layout.num_classes)
        gain, _ = self.layout.gains(w)
        bound = self._check_range(eng, enc_x, gain, float(np.abs(b).max()), "The encrypted forward")
        bias_pts = self._bias(eng, b)
        if workers is None:
            cts = self._load(eng, enc_x, fresh=True)
            plain = self._encoded(eng, w)
            outs = [
                eng.save(self._combine(eng, cts, plain[k], bias_pts[k])) for k in range(self.layout.num_classes)
            ]
        else:
            workers.check(ctx)  # type: ignore[arg-type]
            xs = [bytes(p) for p in enc_x.payloads]
            parts = workers.map(_forward_part, [(self.layout, w, r, xs) for r in workers.chunks(self.layout.num_classes)])
            logits = [ct for part in parts for ct in part]
            outs = [eng.save(self._add_parts(eng, [logits[k]], bias_pts[k])) if bias_pts[k] is not None or logits[k] is None
                    else logits[k] for k in range(self.layout.num_classes)]
        return EncryptedBatch(
            "logits", enc_x.batch, self.layout.num_classes, self.layout, outs, bound, eng.fingerprint, ctx
        )

    def backward_input(self, enc_g: EncryptedBatch, weight: torch.Tensor,
                       workers: Optional[CKKSWorkers] = None) -> EncryptedBatch:
        """Encrypted G @ W (B, in_features) from encrypted G: one ciphertext per feature block.

        With ``workers`` each worker sums over the classes it holds plaintexts for (the forward's split) and
        this process adds the workers' parts.
        """
        ctx = enc_g.context if isinstance(enc_g, EncryptedBatch) else None
        eng = self._incoming(enc_g, ctx, "logit_grads")
        w = _checked_weight(weight, self.layout)
        _, gain = self.layout.gains(w)
        bound = self._check_range(eng, enc_g, gain, 0.0, "The encrypted backward")
        if workers is None:
            cts = self._load(eng, enc_g, fresh=True)
            plain = self._encoded(eng, w)
            outs = [
                eng.save(self._combine(eng, cts, [plain[k][c] for k in range(self.layout.num_classes)], None))
                for c in range(self.layout.n_blocks)
            ]
        else:
            workers.check(ctx)  # type: ignore[arg-type]
            chunks = workers.chunks(self.layout.num_classes)
            parts = workers.map(_backward_part, [(self.layout, w, r, [bytes(p) for p in enc_g.payloads[r.start:r.stop]])
                                                 for r in chunks])
            outs = [eng.save(self._add_parts(eng, [part[c] for part in parts], None)) for c in range(self.layout.n_blocks)]
        return EncryptedBatch(
            "activation_grads", enc_g.batch, self.layout.in_features, self.layout, outs, bound, eng.fingerprint, ctx
        )

    @staticmethod
    def _combine(
        eng: SealEngine,
        cts: Sequence[sa.Ciphertext],
        plains: Sequence[Optional[sa.Plaintext]],
        bias: Optional[sa.Plaintext],
    ) -> sa.Ciphertext:
        """sum_i cts[i] * plains[i], one rescale, + bias.

        SEAL refuses a product that is identically zero ("transparent": it would
        decrypt without the key), so all-zero plaintexts are skipped, as are
        weights too small to survive the encoding (|w| < 2^-41); an output with
        no term left is a fresh public-key encryption of zero.
        """
        acc = rescaled_sum(eng.evaluator, zip(cts, plains))
        if acc is None:
            acc = eng.encrypt_zero(eng.next_parms_id, eng.scale)
        if bias is not None:
            eng.evaluator.add_plain_inplace(acc, bias)
        return acc

    @staticmethod
    def _add_parts(eng: SealEngine, parts: list[Optional[bytes]], bias: Optional[sa.Plaintext]) -> sa.Ciphertext:
        """The workers' rescaled partial sums of one output added, + bias (a fresh enc(0) if no part had a term)."""
        acc: Optional[sa.Ciphertext] = None
        for i, data in enumerate(parts):
            if data is None:
                continue
            ct = eng.load_ciphertext(data, f"a worker's partial sum #{i}")
            if acc is None:
                acc = ct
            else:
                eng.evaluator.add_inplace(acc, ct)
        if acc is None:
            acc = eng.encrypt_zero(eng.next_parms_id, eng.scale)
        if bias is not None:
            eng.evaluator.add_plain_inplace(acc, bias)
        return acc

    def _encoded(self, eng: SealEngine, w: np.ndarray) -> _Encoded:
        """Weight plaintexts for this version, from the cache or encoded now (scale = the prime the rescale drops)."""
        key = (id(eng), eng.fingerprint, digest(w))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        scale = float(eng.data_primes[-1])  # after the rescale the result is back at exactly 2^scale_bits
        blocks = self.layout.weight_blocks(w)
        nonzero = np.any(blocks != 0, axis=2)
        with self._lock:  # an evicted version's plaintexts, to encode into (their memory is already allocated)
            spare = self._spare.pop(id(eng), []) if self._spare else []
        enc: _Encoded = [
            [eng.encode(row, eng.first_parms_id, scale, spare.pop() if spare else None) if nz else None
             for row, nz in zip(blocks[k], nonzero[k])]
            for k in range(blocks.shape[0])
        ]
        with self._lock:
            self._cache[key] = enc
            while len(self._cache) > _CACHE_VERSIONS:
                (eng_id, *_), old = self._cache.popitem(last=False)
                if eng_id == id(eng):
                    self._spare[eng_id] = [pt for per_class in old for pt in per_class if pt is not None]
        return enc

    def _bias(self, eng: SealEngine, b: np.ndarray) -> list[Optional[sa.Plaintext]]:
        key = (id(eng), eng.fingerprint, digest(b))
        with self._lock:
            hit = self._bias_cache.get(key)
            if hit is not None:
                self._bias_cache.move_to_end(key)
                return hit
        vecs = self.layout.bias_slots(b)
        pts = [eng.encode(v, eng.next_parms_id, eng.scale) if b[k] != 0 else None for k, v in enumerate(vecs)]
        with self._lock:
            self._bias_cache[key] = pts
            while len(self._bias_cache) > _CACHE_VERSIONS:
                self._bias_cache.popitem(last=False)
        return pts


def _encrypt_all(eng: SealEngine, ctx: ts.Context, rows: np.ndarray, workers: Optional[CKKSWorkers]) -> list[bytes]:
    if workers is None:
        return [eng.encrypt(z) for z in rows]
    workers.check(ctx)
    return workers.encrypt(rows)


# ---------------------------------------------------------------------------- input checks


def _to_numpy(value: object, name: str) -> np.ndarray:
    """float64 copy of a tensor/array (the caller's tensor is never written)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise HEError(f"{name} is complex; expected real values.")
        return value.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
    if isinstance(value, np.ndarray):
        if np.iscomplexobj(value):
            raise HEError(f"{name} is complex; expected real values.")
        return np.array(value, dtype=np.float64, copy=True)
    raise HEError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise HEError(
            f"{name} has {int(bad.sum())} non-finite value(s), first {name}{list(idx)} = {arr[idx]}; CKKS cannot "
            "encrypt NaN/inf. Check the encoder output or the loss (e.g. lower the learning rate)."
        )


def _checked_matrix(value: object, name: str, width: int, max_batch: int, bound: float) -> np.ndarray:
    arr = _to_numpy(value, name)
    if arr.ndim != 2 or arr.shape[1] != width or not 1 <= arr.shape[0] <= max_batch:
        raise HEError(
            f"{name} has shape {tuple(arr.shape)}; expected (B, {width}) with 1 <= B <= {max_batch} "
            "(the head's batch_size; build PackedLinearHE with a larger batch_size for bigger batches)."
        )
    _check_finite(arr, name)
    peak = float(np.abs(arr).max())
    if peak > bound:
        idx = tuple(int(i) for i in np.unravel_index(np.abs(arr).argmax(), arr.shape))
        raise HEError(
            f"{name}{list(idx)} = {arr[idx]:.6g} exceeds the encryption bound {bound:g}: larger values would "
            "overflow the CKKS scale at the server's output. Normalise/clip them, or pass a larger "
            "PackedLinearHE(value_bound=...) (at most max_abs_value(params))."
        )
    return arr


def _checked_weight(weight: object, layout: PackedLayout) -> np.ndarray:
    w = _to_numpy(weight, "weight")
    shape = (layout.num_classes, layout.in_features)
    if w.shape != shape:
        raise HEError(f"weight has shape {tuple(w.shape)}; this head expects {shape} (num_classes, in_features).")
    _check_finite(w, "weight")
    return w


def _checked_vector(value: object, name: str, size: int) -> np.ndarray:
    v = _to_numpy(value, name)
    if v.shape != (size,):
        raise HEError(f"{name} has shape {tuple(v.shape)}; expected ({size},).")
    _check_finite(v, name)
    return v
