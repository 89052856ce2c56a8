"""Encrypted MLP head: ``logits = W2 · act(W1 x + b1) + b2`` evaluated by the server, non-interactively.

Unlike :class:`~splitfl.he.linear.PackedLinearHE`, whose partial sums the
hospital adds up after decrypting, the hidden pre-activations must be fully
reduced *on the server* before the polynomial activation. So each hidden unit
``j`` is computed as

1. ``sum_b ct_b * plain(W1[j, block b])`` (weights repeated per row), one rescale;
2. rotate-and-sum over the feature groups of the ciphertext: ``log2 F`` rotations
   by ``H * 2^t`` (Galois keys for exactly those steps, see :meth:`PackedMLPHE.rotation_steps`).
   By default the rotations run *before* the rescale of step 1, at scale Δ·q:
   key switching adds an absolute noise (~2^17 at N=16384 here), which is then
   2^40 times smaller relative to the value and divided away by the rescale
   (measured max logit error ~2e-8 instead of ~1e-5), for ~30% more time
   (one more prime per key switch). ``rotate_before_rescale=False`` rotates
   after it (faster, ~1e-5). SEAL's public API has no hoisted rotations, and a
   rotate-and-sum rotates a different ciphertext at each step anyway;
3. ``+ b1[j]``;
4. activation ``c0 + c1 y + c2 y^2``: one ciphertext square + relinearisation;
   the linear and constant terms are added *before* the rescale, at the same
   scale (Δ^2) and level as the square, and ``c2`` is folded into the second
   layer weights (no extra level);
5. ``logits_k = sum_j (c2 W2[k, j]) * act_j`` with scalar plaintexts, one rescale,
   ``+ b2[k]``; the result is mod-switched to the last prime (smallest reply).

Depth 3 (layer 1, square, layer 2): the 'deep' preset (4 rescale levels).

Slot layout (why not the two-samples-per-slot trick of the linear head): a
slot holds ``a + ib`` for two samples; a plaintext multiplication keeps them
apart but the *square* gives ``a^2 - b^2 + 2iab``, which mixes them. Separating
them again costs a conjugation (another key switch) per hidden unit and two
squares instead of one, more than the halved packing saves. This head
therefore uses a sibling :class:`PackedLayout` with one sample per slot
(real part only): a PackedLayout whose capacity is ``2 * H`` puts samples
``0..H-1`` in the real parts and leaves the imaginary parts zero, so
``pack_activations`` / ``weight_blocks`` and the wire format are reused as they
are. ``H`` is rounded up so that ``F = slots / H`` is a power of two: the
rotations are then cyclic over exactly the whole vector and never wrap data
of one row onto another.
"""
from __future__ import annotations

import hashlib
import math
import threading
import weakref

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa
import torch

from .keys import SealEngine, _proto_fields, engine_for, public_context_bytes
from .linear import _check_finite, _checked_matrix, _checked_vector, _to_numpy, load_ciphertexts, sum_of_products
from .packing import PackedLayout
from .params import HEError, check_depth, check_key_switching
from .wire import EncryptedBatch, check_message_shape

__all__ = ["MLP_DEPTH", "PackedMLPHE", "mlp_public_context_bytes"]

MLP_DEPTH = 3  # rescales: layer 1, activation square, layer 2
DEFAULT_VALUE_BOUND = 8.0  # hospital-side |x| bound (a public constant)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def mlp_public_context_bytes(ctx: ts.Context, rotation_steps: list[int]) -> bytes:
    """Server context for an MLP head: public key + relin keys + Galois keys for ``rotation_steps`` only.

    TenSEAL can only generate *all* Galois keys (~log2(N) * 2 keys, hundreds of
    MB at N=16384); here SEAL's KeyGenerator makes just the needed steps from the
    hospital's secret key and they are merged into the public context protobuf
    (field public_context.galois_keys). Hospital side only.
    """
    if not isinstance(ctx, ts.Context) or not ctx.is_private():
        raise HEError("mlp_public_context_bytes needs the hospitals' secret context (it generates Galois keys).")
    if not ctx.has_relin_keys():
        ctx.generate_relin_keys()
    eng = engine_for(ctx)
    check_key_switching(eng.params)
    steps = sorted({int(s) for s in rotation_steps})
    if not steps or any(s <= 0 or s >= eng.slots for s in steps):
        raise HEError(f"rotation_steps={steps} must be non-empty, within 1..{eng.slots - 1}.")
    gt = eng.context.key_context_data().galois_tool()
    keygen = sa.KeyGenerator(eng.context, eng.secret_key)
    galois = eng.save(keygen.create_galois_keys(gt.get_elts_from_steps(steps)))
    data = public_context_bytes(ctx, relin=True, galois=False)
    # Protobuf merges repeated occurrences of a singular message field: append
    # a second public_context (field 2) holding only galois_keys (field 5).
    inner = _varint(5 << 3 | 2) + _varint(len(galois)) + galois
    return data + _varint(2 << 3 | 2) + _varint(len(inner)) + inner


class _EvalKeys:
    def __init__(self, relin: sa.RelinKeys, galois: sa.GaloisKeys) -> None:
        self.relin = relin
        self.galois = galois


_KEYS: weakref.WeakKeyDictionary[ts.Context, _EvalKeys] = weakref.WeakKeyDictionary()
_KEYS_LOCK = threading.Lock()


def _eval_keys(ctx: ts.Context, eng: SealEngine, steps: list[int]) -> _EvalKeys:
    """The context's relin and Galois keys as SEAL objects; HEError when any needed key is missing."""
    with _KEYS_LOCK:
        keys = _KEYS.get(ctx)
    if keys is None:
        if not ctx.has_relin_keys():
            raise HEError(
                "The server context has no relinearisation keys; the MLP head squares ciphertexts. Send "
                "mlp_public_context_bytes(ctx, head.rotation_steps()) instead of public_context_bytes(ctx)."
            )
        if steps and not ctx.has_galois_keys():
            raise HEError(
                "The server context has no Galois keys; the MLP head rotates ciphertexts to sum each hidden "
                "unit's features. Send mlp_public_context_bytes(ctx, head.rotation_steps())."
            )
        raw = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
        public = _proto_fields(_proto_fields(raw, "context")[2][0], "public context")
        relin, galois = sa.RelinKeys(), sa.GaloisKeys()
        with eng._io.lock:
            try:
                eng._io.write(public[4][0])
                relin.load(eng.context, eng._io.path)
                if 5 in public:  # Galois keys (absent where nothing rotates, e.g. split-he-full at batch 1)
                    eng._io.write(public[5][0])
                    galois.load(eng.context, eng._io.path)
            except Exception as e:
                raise HEError(f"The context's evaluation keys do not load for its parameters ({e}).") from e
            finally:
                eng._io.wipe()
        keys = _EvalKeys(relin, galois)
        with _KEYS_LOCK:
            _KEYS[ctx] = keys
    gt = eng.context.key_context_data().galois_tool()
    missing = [s for s, e in zip(steps, gt.get_elts_from_steps(steps)) if not keys.galois.has_key(e)]
    if missing:
        raise HEError(
            f"The server context lacks Galois keys for rotation step(s) {missing} (needed: {steps}); build it "
            "with mlp_public_context_bytes(ctx, head.rotation_steps())."
        )
    return keys


class PackedMLPHE:
    """CKKS evaluation of ``W2 · act(W1 x + b1) + b2`` (act: polynomial of degree <= 2) on packed batches."""

    def __init__(
        self,
        in_features: int,
        hidden: int,
        num_classes: int,
        batch_size: int,
        slots: int,
        activation_coeffs: tuple[float, ...],
        *,
        value_bound: float = DEFAULT_VALUE_BOUND,
        rotate_before_rescale: bool = True,
    ) -> None:
        for name, v in (("in_features", in_features), ("hidden", hidden), ("num_classes", num_classes),
                        ("batch_size", batch_size), ("slots", slots)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise HEError(f"PackedMLPHE: {name}={v!r} must be a positive integer.")
        if slots & (slots - 1):
            raise HEError(f"PackedMLPHE: slots={slots} must be a power of two (N/2).")
        if batch_size > slots:
            raise HEError(f"PackedMLPHE: batch_size={batch_size} exceeds the {slots} slots of a ciphertext.")
        coeffs = tuple(float(c) for c in activation_coeffs)
        if not 1 <= len(coeffs) <= 3 or not all(math.isfinite(c) for c in coeffs):
            raise HEError(
                f"PackedMLPHE: activation_coeffs={activation_coeffs!r} must be 1 to 3 finite coefficients "
                "(ascending powers, degree <= 2)."
            )
        self.coeffs = coeffs + (0.0,) * (3 - len(coeffs))
        if not (math.isfinite(value_bound) and value_bound > 0):
            raise HEError(f"PackedMLPHE: value_bound={value_bound!r} must be a positive finite number.")
        self.value_bound = float(value_bound)
        self.rotate_before_rescale = bool(rotate_before_rescale)
        self.in_features, self.hidden, self.num_classes, self.batch_size = in_features, hidden, num_classes, batch_size
        # One sample per slot; F = features per block is a power of two and F * H = slots.
        f = 1 << ((slots // batch_size).bit_length() - 1)
        rows = slots // f
        self.layout = PackedLayout(in_features, num_classes, 2 * rows, slots)  # wire layout (real parts only)
        self._hidden_layout = PackedLayout(in_features, hidden, 2 * rows, slots)
        assert self.layout.rows == rows and self.layout.features_per_block == f
        self._w1_cache: tuple | None = None
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        return self.layout.slots

    def __repr__(self) -> str:
        lay = self.layout
        return (
            f"PackedMLPHE({self.in_features}->{self.hidden}->{self.num_classes}, batch<={self.batch_size}, "
            f"slots={lay.slots}: {lay.n_blocks} ciphertext(s) of {lay.features_per_block} features x {lay.rows} rows)"
        )

    def rotation_steps(self) -> list[int]:
        """Left-rotation steps of the rotate-and-sum: H * 2^t for t < ceil(log2(min(F, in_features)))."""
        groups = min(self.layout.features_per_block, self.in_features)
        return [self.layout.rows << t for t in range(math.ceil(math.log2(groups)))] if groups > 1 else []

    # ------------------------------------------------------------------ checks
    def _engine(self, ctx: ts.Context) -> SealEngine:
        eng = engine_for(ctx)
        if eng.slots != self.slots:
            raise HEError(f"{self!r} was built for {self.slots} slots but the context has {eng.slots}.")
        check_depth(eng.params, MLP_DEPTH)
        return eng

    def _output_limit(self, eng: SealEngine) -> float:
        # The reply lives on the first prime alone: 2 bits of margin below its half.
        return float(2 ** (eng.params.coeff_mod_bit_sizes[0] - eng.params.scale_bits - 2))

    def _incoming(self, enc: EncryptedBatch, ctx: ts.Context | None, kind: str) -> SealEngine:
        if not isinstance(enc, EncryptedBatch):
            raise HEError(f"Expected an EncryptedBatch of {kind}, got {type(enc).__name__}.")
        if ctx is None:
            raise HEError(f"This encrypted {enc.kind} batch has no context (EncryptedBatch.from_bytes(ctx, ...)).")
        if enc.kind != kind:
            raise HEError(f"Expected an encrypted {kind!r} batch, got {enc.kind!r}.")
        if enc.layout != self.layout:
            raise HEError(f"Encrypted {kind} batch was packed for {enc.layout}, but this MLP head uses {self.layout}.")
        eng = self._engine(ctx)
        if enc.fingerprint != eng.fingerprint:
            raise HEError(f"Encrypted {kind} batch was made under another context ({enc.fingerprint[:19]}...).")
        check_message_shape(self.layout, kind, enc.batch, enc.dim, len(enc.payloads), ctx)
        if enc.batch > self.batch_size:
            raise HEError(f"Encrypted {kind} batch has {enc.batch} samples; this head holds at most {self.batch_size}.")
        return eng

    # ----------------------------------------------------------- hospital side
    def encrypt_activations(self, ctx: ts.Context, x: torch.Tensor) -> EncryptedBatch:
        """Encrypt ``x`` (B <= batch_size, in_features), |x| <= value_bound, one sample per slot."""
        eng = self._engine(ctx)
        arr = _checked_matrix(x, "activations x", self.in_features, self.batch_size, self.value_bound)
        payloads = [eng.encrypt(z) for z in self.layout.pack_activations(arr)]
        return EncryptedBatch(
            "activations", arr.shape[0], arr.shape[1], self.layout, payloads, self.value_bound, eng.fingerprint, ctx
        )

    def decrypt_logits(self, ctx: ts.Context, enc: EncryptedBatch, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, num_classes) logits: slot p (feature group 0) of each class ciphertext."""
        eng = self._incoming(enc, ctx, "logits")
        last = eng.context.last_parms_id()
        out = np.stack([eng.decrypt(ct) for ct in load_ciphertexts(eng, enc, last, "the MLP reply (last level)")])
        vals = out[:, : enc.batch].real.T.copy()  # (B, K)
        limit = self._output_limit(eng)
        peak = float(np.abs(vals).max())
        if not peak <= limit:
            raise HEError(f"Decrypted MLP logits reach |{peak:.4g}| > {limit:g}: the server's result overflowed.")
        return torch.from_numpy(vals).to(dtype or torch.get_default_dtype())

    # ------------------------------------------------------------- server side
    def prepare(self, ctx: ts.Context, w1: torch.Tensor) -> None:
        """Encode the first-layer plaintexts of a weight version ahead of time (~1 s at N=16384, d=512, hidden=16)."""
        eng = self._engine(ctx)
        drop = eng.context.get_context_data(eng.first_parms_id).parms().coeff_modulus()[-1].value()
        self._w1_plain(eng, _checked_w(w1, "w1", (self.hidden, self.in_features)), float(drop))

    def forward(self, enc_x: EncryptedBatch, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor) -> EncryptedBatch:
        """Encrypted logits (one ciphertext per class). Needs relin keys and the Galois keys of rotation_steps()."""
        ctx = enc_x.context if isinstance(enc_x, EncryptedBatch) else None
        eng = self._incoming(enc_x, ctx, "activations")
        w1n = _checked_w(w1, "w1", (self.hidden, self.in_features))
        w2n = _checked_w(w2, "w2", (self.num_classes, self.hidden))
        b1n = _checked_vector(b1, "b1", self.hidden)
        b2n = _checked_vector(b2, "b2", self.num_classes)
        steps = self.rotation_steps()
        keys = _eval_keys(ctx, eng, steps)
        self._check_range(eng, enc_x.value_bound, w1n, b1n, w2n, b2n)
        cts = load_ciphertexts(eng, enc_x, eng.first_parms_id, "a fresh encryption")

        ev, enc = eng.evaluator, eng.encoder
        c0, c1, c2 = self.coeffs
        # act = g * (y^2 + a1 y + a0) when c2 != 0, else g * (a1 y + a0) with g = 1.
        g, a1, a0 = (c2, c1 / c2, c0 / c2) if c2 != 0 else (1.0, c1, c0)
        delta = eng.scale
        chain = [eng.context.get_context_data(eng.first_parms_id)]
        while chain[-1].next_context_data() is not None:
            chain.append(chain[-1].next_context_data())
        # chain[i]: i rescales done; the prime dropped by rescale i+1 is chain[i]'s last prime.
        drop = [cd.parms().coeff_modulus()[-1].value() for cd in chain]
        pid = [cd.parms_id() for cd in chain]

        w1_plain = self._w1_plain(eng, w1n, float(drop[0]))
        acts: list[sa.Ciphertext | None] = []
        for j in range(self.hidden):
            y = sum_of_products(ev, zip(cts, w1_plain[j]))
            if y is None:
                y = eng.encrypt_zero(pid[1], delta)
            else:
                if self.rotate_before_rescale:
                    _rotate_and_sum(ev, y, steps, keys.galois)
                ev.rescale_to_next_inplace(y)
                y.scale = delta  # (Δ * q) / q: exact
                if not self.rotate_before_rescale:
                    _rotate_and_sum(ev, y, steps, keys.galois)
            if b1n[j] != 0:
                ev.add_plain_inplace(y, _scalar(enc, b1n[j], pid[1], delta))
            # Activation at scale Δ^2 on level 1, then one rescale.
            if c2 != 0:
                t = sa.Ciphertext()
                ev.square(y, t)
                ev.relinearize_inplace(t, keys.relin)
            else:
                t = None
            if a1 != 0:
                lin = sa.Ciphertext()
                try:
                    ev.multiply_plain(y, _scalar(enc, a1, pid[1], delta), lin)
                    t = lin if t is None else (ev.add_inplace(t, lin) or t)
                except (RuntimeError, ValueError) as e:
                    if "transparent" not in str(e):
                        raise
            if t is None:  # constant activation (or a transparent linear term)
                t = eng.encrypt_zero(pid[1], delta * delta)
            if a0 != 0:
                ev.add_plain_inplace(t, _scalar(enc, a0, pid[1], t.scale))
            ev.rescale_to_next_inplace(t)
            acts.append(t)

        s2 = acts[0].scale
        for t in acts:
            t.scale = s2  # all equal (same Δ^2 / q); pin them for add
        outs = []
        for k in range(self.num_classes):
            wscale = delta * drop[2] / s2  # after the rescale the logits are back at ~Δ
            weights = (g * w2n[k, j] for j in range(len(acts)))
            acc = sum_of_products(ev, ((t, _scalar(enc, w, pid[2], wscale) if w != 0 else None)
                                       for t, w in zip(acts, weights)))
            if acc is None:
                acc = eng.encrypt_zero(pid[3], delta)
            else:
                ev.rescale_to_next_inplace(acc)
            acc.scale = delta  # relative change ~1e-16 from the float rounding of wscale
            if b2n[k] != 0:
                ev.add_plain_inplace(acc, _scalar(enc, b2n[k], pid[3], delta))
            ev.mod_switch_to_inplace(acc, eng.context.last_parms_id())
            outs.append(eng.save(acc))
        return EncryptedBatch(
            "logits", enc_x.batch, self.num_classes, self.layout, outs, self._output_limit(eng), eng.fingerprint, ctx
        )

    def _check_range(self, eng: SealEngine, xb: float, w1, b1, w2, b2) -> None:
        """Worst-case |value| propagation through the head (public bounds and the server's own weights)."""
        c0, c1, c2 = self.coeffs
        h = float(np.abs(w1).sum(axis=1).max()) * xb + float(np.abs(b1).max())
        a = abs(c0) + abs(c1) * h + abs(c2) * h * h
        out = float(np.abs(w2).sum(axis=1).max()) * a + float(np.abs(b2).max())
        limit = self._output_limit(eng)
        if max(h * h, out) > limit:
            raise HEError(
                f"The encrypted MLP could overflow: hidden pre-activations up to {h:.4g}, logits up to {out:.4g} "
                f"(limit {limit:g} for {eng.params.describe()}). Lower value_bound or the head's weights."
            )

    def _w1_plain(self, eng: SealEngine, w1: np.ndarray, scale: float) -> list[list[sa.Plaintext | None]]:
        key = (id(eng), eng.fingerprint, hashlib.sha256(w1.tobytes()).digest())
        with self._lock:
            if self._w1_cache is not None and self._w1_cache[0] == key:
                return self._w1_cache[1]
        blocks = self._hidden_layout.weight_blocks(w1)  # (hidden, n_blocks, slots)
        plain = [
            [eng.encode(row, eng.first_parms_id, scale) if np.any(row != 0) else None for row in blocks[j]]
            for j in range(self.hidden)
        ]
        with self._lock:
            self._w1_cache = (key, plain)
        return plain


def _rotate_and_sum(ev: sa.Evaluator, ct: sa.Ciphertext, steps: list[int], galois: sa.GaloisKeys) -> None:
    rot = sa.Ciphertext()
    for s in steps:
        ev.rotate_vector(ct, s, galois, rot)
        ev.add_inplace(ct, rot)


def _scalar(encoder: sa.CKKSEncoder, value: float, parms_id: list, scale: float) -> sa.Plaintext:
    pt = sa.Plaintext()
    encoder.encode(float(value), parms_id, scale, pt)
    return pt


def _checked_w(value: object, name: str, shape: tuple[int, int]) -> np.ndarray:
    w = _to_numpy(value, name)
    if w.shape != shape:
        raise HEError(f"{name} has shape {tuple(w.shape)}; this MLP head expects {shape}.")
    _check_finite(w, name)
    return w
