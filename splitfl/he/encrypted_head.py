"""split-he-full: a linear head whose weights are CKKS ciphertexts too, trained by SGD on ciphertexts.

In ``split-he`` the server multiplies encrypted activations by *plaintext* weights and receives a
batch-aggregated plaintext update. Here the server holds ``enc(W)`` under the consortium's key and
never sees a plaintext activation, label, gradient or weight:

* **forward** — the hospital sends ``enc(x)``; the server returns ``enc(partial logits)``: per pair of
  classes, the sum over blocks of ``enc(x_c) * enc(W_pc)`` (ciphertext x ciphertext, relinearised once,
  rescaled once). The hospital decrypts and adds the ``F`` partial sums of each sample (a reduction that
  may happen after decryption).
* **update** — the hospital, which holds its plaintext batch and the logit gradient ``G = dL/dlogits``,
  computes ``lr * dL/dW = lr * G^T [x, 1]`` itself and sends it encrypted *in the weights' own layout*;
  the server subtracts it, ciphertext from ciphertext. Nothing is rotated, so the server needs no Galois
  keys, and the weights never lose a level: they stay at the top level however many updates they take.
* **input gradient** — for encoder fine-tuning the hospital also sends ``enc(lr * G)`` and the server
  returns ``enc((lr G) @ W)`` (``lr * dL/dx``), computed with the weights *before* the update, as autograd
  does.

**Layout** (:class:`FullHeadLayout`): sample-major slots: slot ``i * F + f`` holds feature ``f`` of sample
``i`` in a block of ``F = slots // B`` features. A constant-1 feature carries the bias, so ``W`` includes it
as its last column. The weights are repeated in every sample's slots, so one slot-wise product multiplies
every sample by the same weights. Two classes share a ciphertext: the activations are real, the weights of
classes ``2p`` and ``2p + 1`` are the real and imaginary parts of one complex slot, and
``x * (w + i v) = x w + i x v`` keeps them apart; the input gradient sends ``lr (G_2p - i G_2p+1)``, whose
product with ``w + i v`` has ``G_2p w + G_2p+1 v`` as its real part. The head is thus
``ceil(K / 2) * ceil((d + 1) / F)`` ciphertexts.

**Why the hospital encrypts the update.** The update has one value per weight, but the layout repeats each
weight ``B`` times; summing the per-sample products over the batch on ciphertexts takes ``log2(B)``
rotations per weight ciphertext, each a key switch that costs more than a fresh encryption and adds a fixed
key-switching error the server then had to cancel. The hospital has the batch in plaintext, so it forms the
sum before encrypting: the update costs one encryption per weight ciphertext and one addition on the
server. The server learns nothing more: every value it receives is still a ciphertext under the consortium's
key, and what a hospital encrypts is what it could compute from its own batch.

**Scales and errors.** Everything is fresh at the top level and the context's scale, so weights and updates
add exactly; a forward or input-gradient product is relinearised, then rescaled once. The ``full`` preset
encrypts at 2^50 (fresh noise ~1e-12) and rescales by a 60-bit prime, so results land at ~2^40 with 19 integer
bits (rounding ~1e-8 per slot). Each update adds one fresh encryption's noise, so the weights' error grows like
a random walk of ~1e-12 steps; the release averages the ``B`` copies of each weight. The hospital sends ``B G``
rather than ``G`` (~1/B per sample) for the input gradient, so it uses the ciphertext's precision.
:meth:`EncryptedLinearHead.needs_refresh` still asks the key holders to decrypt and re-encrypt the
weights once a budget of updates is spent (:data:`DEFAULT_REFRESH_EVERY`), and
:attr:`EncryptedLinearHead.refreshes` counts how often that happened.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa
import torch

from .keys import SealEngine, engine_for, public_context_bytes
from .mlp import _eval_keys
from .packing import check_positive_fields
from .parallel import CKKSWorkers
from .params import HEError, check_product_depth

__all__ = ["DEFAULT_REFRESH_EVERY", "EncryptedLinearHead", "FullHeadLayout", "FullHeadHospital",
           "full_public_context_bytes"]

# Updates between two refreshes of the encrypted weights (decrypt + re-encrypt at a key holder). Each update
# adds one fresh encryption's noise, so 1000 updates leave the weights ~1e-8 from plaintext SGD
# (measured: splitfl bench he-head --full-drift 1000), far below what SGD's steps change.
DEFAULT_REFRESH_EVERY = 1000


@dataclass(frozen=True)
class FullHeadLayout:
    """Slot layout of an encrypted linear head ``in_features -> num_classes`` (bias as an extra feature)."""

    in_features: int
    num_classes: int
    batch_size: int
    slots: int

    def __post_init__(self) -> None:
        check_positive_fields(self, ("in_features", "num_classes", "batch_size", "slots"))
        if self.batch_size > self.slots:
            raise HEError(f"FullHeadLayout: batch_size={self.batch_size} exceeds the {self.slots} slots of a "
                          "ciphertext; use a smaller batch or a larger poly_modulus_degree.")

    @property
    def features(self) -> int:
        """Packed features: the inputs and the constant 1 of the bias."""
        return self.in_features + 1

    @property
    def features_per_block(self) -> int:
        return self.slots // self.batch_size

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.features / self.features_per_block)

    @property
    def pairs(self) -> int:
        """Ciphertexts per block of weights (and per logits message): two classes each."""
        return math.ceil(self.num_classes / 2)

    def backward_count(self, input_grad: bool) -> int:
        """Ciphertexts of a backward message: ``enc(B G)`` (pairs, if ``input_grad``) then the update."""
        return self.pairs * (self.n_blocks + int(input_grad))

    # -- plaintext matrices <-> slot vectors (key holders only) ------------------
    def _blocks(self, m: np.ndarray) -> np.ndarray:
        """(B', features) -> (n_blocks, slots): slot i * F + f of block c = m[i, c * F + f]."""
        f, nb, b = self.features_per_block, self.n_blocks, self.batch_size
        full = np.zeros((b, nb * f), dtype=m.dtype)
        full[: m.shape[0], : m.shape[1]] = m
        out = np.zeros((nb, self.slots), dtype=m.dtype)
        out[:, : b * f] = full.reshape(b, nb, f).transpose(1, 0, 2).reshape(nb, b * f)
        return out

    def _paired(self, m: np.ndarray, sign: float = 1.0) -> np.ndarray:
        """(K, n) real -> (pairs, n) complex: row p = m[2p] + sign * i m[2p + 1] (zero past the last class)."""
        full = np.zeros((2 * self.pairs, m.shape[1]))
        full[: m.shape[0]] = m
        return full[0::2] + sign * 1j * full[1::2]

    def _unpaired(self, z: np.ndarray) -> np.ndarray:
        """(pairs, ...) complex -> (K, ...) real: the inverse of :meth:`_paired`."""
        return np.stack([z.real, z.imag], axis=1).reshape(2 * self.pairs, *z.shape[1:])[: self.num_classes]

    def _check_batch(self, m: np.ndarray, width: int, what: str) -> None:
        if m.ndim != 2 or m.shape[1] != width or not 1 <= m.shape[0] <= self.batch_size:
            raise HEError(f"{what} of shape {m.shape}: expected (B, {width}) with 1 <= B <= {self.batch_size}")

    def pack_activations(self, x: np.ndarray) -> np.ndarray:
        """(B', in_features) -> (n_blocks, slots), with the bias's 1 for every real sample."""
        self._check_batch(x, self.in_features, "activations")
        return self._blocks(np.concatenate([x, np.ones((x.shape[0], 1))], axis=1))

    def pack_weights(self, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """(K, in_features), (K,) -> (pairs, n_blocks, slots) complex: W[k, feature] in every sample's slot."""
        return self.pack_update(np.concatenate([weight, bias[:, None]], axis=1))

    def pack_update(self, w: np.ndarray) -> np.ndarray:
        """(K, features) -> (pairs, n_blocks, slots): the weights' layout, for an update as for the weights."""
        if w.shape != (self.num_classes, self.features):
            raise HEError(f"weights of shape {w.shape}: expected ({self.num_classes}, {self.features})")
        paired = self._paired(w)
        return np.stack([self._blocks(np.repeat(paired[p][None], self.batch_size, axis=0)) for p in range(self.pairs)])

    def pack_logit_grads(self, g: np.ndarray) -> np.ndarray:
        """(B', K) -> (pairs, slots): G[i, 2p] - i G[i, 2p+1] in every feature slot of sample i."""
        self._check_batch(g, self.num_classes, "logit gradients")
        f = self.features_per_block
        full = np.zeros((self.batch_size, self.num_classes))
        full[: g.shape[0]] = g
        out = np.zeros((self.pairs, self.slots), dtype=np.complex128)
        out[:, : self.batch_size * f] = np.repeat(self._paired(full.T, -1.0), f, axis=1)
        return out

    def unpack_logits(self, slots: np.ndarray, batch: int) -> np.ndarray:
        """(pairs, slots) partial products -> (batch, K): the F partial sums of each sample added."""
        f, b = self.features_per_block, self.batch_size
        sums = slots[:, : b * f].reshape(self.pairs, b, f).sum(axis=2)  # (pairs, B) complex
        return self._unpaired(sums).T[:batch]

    def unpack_activation_grads(self, slots: np.ndarray, batch: int) -> np.ndarray:
        """(n_blocks, slots) -> (batch, in_features): the real part (the imaginary part is a cross term)."""
        f, nb, b = self.features_per_block, self.n_blocks, self.batch_size
        real = np.real(slots[:, : b * f])
        return real.reshape(nb, b, f).transpose(1, 0, 2).reshape(b, nb * f)[:batch, : self.in_features]

    def unpack_weights(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pairs, n_blocks, slots) -> weight (K, in_features), bias (K,): the mean of the B copies of each."""
        f, nb, b = self.features_per_block, self.n_blocks, self.batch_size
        per = slots[:, :, : b * f].reshape(self.pairs, nb, b, f).mean(axis=2).reshape(self.pairs, nb * f)
        w = self._unpaired(per)[:, : self.features]
        return w[:, :-1], w[:, -1]


def full_public_context_bytes(ctx: ts.Context, layout: Optional[FullHeadLayout] = None) -> bytes:
    """The server's context: public key and relinearisation keys (no Galois keys: nothing rotates)."""
    if not ctx.has_relin_keys():
        ctx.generate_relin_keys()
    return public_context_bytes(ctx, relin=True)


class FullHeadHospital:
    """The key holders' side: encrypt, decrypt, release and refresh (they hold the consortium's secret key)."""

    def __init__(self, ctx: ts.Context, layout: FullHeadLayout, workers: Optional[CKKSWorkers] = None) -> None:
        """``workers``: processes holding ``ctx`` that share the encryptions (the update's are most of a step)."""
        self.eng = engine_for(ctx)
        if not self.eng.private:
            raise HEError("FullHeadHospital needs the consortium's secret context.")
        if self.eng.slots != layout.slots:
            raise HEError(f"layout has {layout.slots} slots, the context {self.eng.slots}")
        if workers is not None:
            workers.check(ctx)
        self.layout, self.workers = layout, workers

    def _encrypt(self, rows: np.ndarray) -> list[bytes]:
        rows = rows.astype(np.complex128)
        if self.workers is not None and len(rows) > 1:
            return self.workers.encrypt(rows)
        return [self.eng.encrypt(r) for r in rows]

    def encrypt_weights(self, weight: torch.Tensor, bias: torch.Tensor) -> list[list[bytes]]:
        """``[pair][block]`` fresh ciphertexts of the initial (or refreshed) weights."""
        packed = self.layout.pack_weights(weight.detach().double().numpy(), bias.detach().double().numpy())
        flat, nb = self._encrypt(packed.reshape(-1, self.layout.slots)), self.layout.n_blocks
        return [flat[p * nb:(p + 1) * nb] for p in range(self.layout.pairs)]

    def encrypt_activations(self, x: torch.Tensor) -> list[bytes]:
        return self._encrypt(self.layout.pack_activations(x.detach().double().cpu().numpy()))

    def encrypt_logit_grads(self, g: torch.Tensor) -> list[bytes]:
        """``enc(B G)``, class pairs conjugated, for the server's ``(B G) @ W`` (the input gradient).

        ``G`` of a mean loss is ~1/B per sample; scaled by the (public) batch capacity ``B`` it uses the
        ciphertext's precision, and the hospital divides the result by ``B`` again.
        """
        return self._encrypt(self.layout.pack_logit_grads(self.layout.batch_size * g.detach().double().cpu().numpy()))

    def encrypt_update(self, g: torch.Tensor, x: torch.Tensor, lr: float) -> list[bytes]:
        """``enc(lr * dL/dW)`` in the weights' layout, ``[pair][block]`` flattened: ``lr * G^T [x, 1]``."""
        gd, xd = g.detach().double().cpu().numpy(), x.detach().double().cpu().numpy()
        if gd.ndim != 2 or xd.ndim != 2 or gd.shape[0] != xd.shape[0]:
            raise HEError(f"update: logit gradients {gd.shape} and activations {xd.shape} must share the batch")
        self.layout._check_batch(xd, self.layout.in_features, "activations")
        dw = lr * (gd.T @ np.concatenate([xd, np.ones((len(xd), 1))], axis=1))
        return self._encrypt(self.layout.pack_update(dw).reshape(-1, self.layout.slots))

    def _decrypt(self, cts: list[bytes], what: str) -> np.ndarray:
        if self.workers is not None and len(cts) > 1:
            return self.workers.decrypt(cts, what)
        return np.stack([self.eng.decrypt(self.eng.load_ciphertext(ct, f"{what} #{i}")) for i, ct in enumerate(cts)])

    def decrypt_logits(self, cts: list[bytes], batch: int) -> torch.Tensor:
        """(batch, K) logits from the server's partial products."""
        return torch.from_numpy(self.layout.unpack_logits(self._decrypt(cts, "logits"), batch))

    def decrypt_activation_grads(self, cts: list[bytes], batch: int) -> torch.Tensor:
        """dL/dx: the server computed ``(B G) @ W``; the hospital divides by ``B``."""
        slots = self._decrypt(cts, "activation gradient") / self.layout.batch_size
        return torch.from_numpy(self.layout.unpack_activation_grads(slots, batch))

    def decrypt_weights(self, cts: list[list[bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Release: the key holders decrypt the head (at the end of training, or to refresh it)."""
        w, b = self.layout.unpack_weights(np.stack([self._decrypt(row, "weight") for row in cts]))
        return torch.from_numpy(w), torch.from_numpy(b)


class EncryptedLinearHead:
    """The server's head: ``enc(W)`` only, and a public context with relinearisation keys."""

    def __init__(self, public_ctx: ts.Context, layout: FullHeadLayout, weights: list[list[bytes]],
                 refresh_every: int = DEFAULT_REFRESH_EVERY) -> None:
        self.eng: SealEngine = engine_for(public_ctx)
        check_product_depth(self.eng.params)  # one ciphertext x ciphertext product per output, rescaled once
        if self.eng.slots != layout.slots:
            raise HEError(f"layout has {layout.slots} slots, the context {self.eng.slots}")
        self.layout = layout
        self.relin = _eval_keys(public_ctx, self.eng, []).relin
        self.refresh_every = int(refresh_every)
        self.updates_since_refresh = 0
        self.updates = 0
        self.refreshes = 0
        self._forwarded = False  # a training forward came first: the protocol's order, step by step
        self.weights = self._load_weights(weights)

    # -- state ---------------------------------------------------------------
    def _load(self, data: bytes, what: str) -> sa.Ciphertext:
        """A ciphertext of the hospitals' or of this server's: two polynomials at the top level and scale."""
        ct = self.eng.load_ciphertext(data, what)
        if ct.parms_id() != self.eng.first_parms_id or ct.size() != 2:
            raise HEError(f"{what}: at the wrong level or size (expected a fresh ciphertext of 2 polynomials)")
        if ct.scale != self.eng.scale:
            raise HEError(f"{what}: scale {ct.scale!r}, expected {self.eng.scale!r} (encrypt it with FullHeadHospital)")
        return ct

    def _load_weights(self, weights: list[list[bytes]]) -> list[list[sa.Ciphertext]]:
        lay = self.layout
        if len(weights) != lay.pairs or any(len(r) != lay.n_blocks for r in weights):
            raise HEError(f"encrypted weights: expected {lay.pairs} x {lay.n_blocks} ciphertexts")
        return [[self._load(data, f"weight ciphertext [{p}][{c}]") for c, data in enumerate(row)]
                for p, row in enumerate(weights)]

    def needs_refresh(self) -> bool:
        return self.updates_since_refresh >= self.refresh_every

    def state(self) -> dict[str, object]:
        """Checkpoint: the encrypted weights as this server holds them, and the update and refresh counters."""
        return {"weights": self.export_weights(), "updates": self.updates,
                "updates_since_refresh": self.updates_since_refresh, "refreshes": self.refreshes}

    def load_state(self, state: dict[str, object]) -> None:
        """Resume from :meth:`state`."""
        self.weights = self._load_weights(state["weights"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[arg-type]
        self.updates_since_refresh = int(state["updates_since_refresh"])  # type: ignore[arg-type]
        self.refreshes = int(state["refreshes"])  # type: ignore[arg-type]

    def restore_weights(self, weights: list[list[bytes]], fresh: bool) -> None:
        """Go back to an earlier head (the best epoch's, for the final test), counters kept: not a refresh.

        ``fresh``: the key holders' new encryption of it (resets the refresh budget), or, ``False``,
        ciphertexts this server exported then.
        """
        self.weights = self._load_weights(weights)
        if fresh:
            self.updates_since_refresh = 0

    def replace_weights(self, weights: list[list[bytes]]) -> None:
        """A refresh: the key holders' fresh encryption of the (decrypted) weights replaces the worn ones."""
        self.restore_weights(weights, fresh=True)
        self.refreshes += 1

    # -- arithmetic ------------------------------------------------------------
    def _dot(self, pairs: list[tuple[sa.Ciphertext, sa.Ciphertext]]) -> sa.Ciphertext:
        """Sum of products, relinearised and rescaled once (lazily: one key switch per output)."""
        ev = self.eng.evaluator
        total: Optional[sa.Ciphertext] = None
        prod = sa.Ciphertext()
        for a, b in pairs:
            if total is None:
                total = sa.Ciphertext()
                ev.multiply(a, b, total)
            else:
                ev.multiply(a, b, prod)
                ev.add_inplace(total, prod)
        assert total is not None
        ev.relinearize_inplace(total, self.relin)
        ev.rescale_to_next_inplace(total)
        return total

    def _incoming(self, data: list[bytes], n: int, what: str) -> list[sa.Ciphertext]:
        if len(data) != n:
            raise HEError(f"{what}: expected {n} ciphertexts, got {len(data)}")
        return [self._load(d, f"{what} #{i}") for i, d in enumerate(data)]

    def forward(self, enc_x: list[bytes], train: bool = True) -> list[bytes]:
        """``enc(partial logits)``, one ciphertext per pair of classes; a training forward opens a backward."""
        x = self._incoming(enc_x, self.layout.n_blocks, "activation")
        out = [self.eng.save(self._dot(list(zip(x, wp)))) for wp in self.weights]
        self._forwarded = self._forwarded or train
        return out

    def backward(self, cts: list[bytes], input_grad: bool) -> Optional[list[bytes]]:
        """Apply the hospital's ``enc(lr dL/dW)``; first return ``enc(B dL/dx)`` (with the old weights) if asked.

        ``cts``: ``enc(B G)`` (one per pair, only with ``input_grad``) then the update, ``[pair][block]``
        flattened. Every ciphertext is parsed and checked before the weights change.
        """
        if not self._forwarded:
            raise HEError("backward without a training forward: send the activations first")
        lay = self.layout
        loaded = self._incoming(cts, lay.backward_count(input_grad), "backward message")
        g, update = (loaded[: lay.pairs], loaded[lay.pairs:]) if input_grad else ([], loaded)
        grads = None
        if input_grad:  # before the update: autograd's dL/dx uses the weights of the forward pass
            grads = [self.eng.save(self._dot([(g[p], self.weights[p][c]) for p in range(lay.pairs)]))
                     for c in range(lay.n_blocks)]
        ev = self.eng.evaluator
        for p, row in enumerate(self.weights):
            for c, w in enumerate(row):
                ev.sub_inplace(w, update[p * lay.n_blocks + c])
        self._forwarded = False
        self.updates += 1
        self.updates_since_refresh += 1
        return grads

    def export_weights(self) -> list[list[bytes]]:
        """The encrypted weights as bytes, for the key holders (release at the end, or a refresh)."""
        return [[self.eng.save(ct) for ct in row] for row in self.weights]

    def has_secret_key(self) -> bool:
        return self.eng.private
