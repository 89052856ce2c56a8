"""Where each number of a batch sits in the CKKS slots (pure index arithmetic, no crypto).

Layout: feature-major blocks of complex slots, two samples per slot.

* A batch of capacity ``batch_size`` is split into ``H = ceil(batch_size / 2)``
  sample pairs; sample ``s`` lives in the real part of row ``s`` when
  ``s < H`` and in the imaginary part of row ``s - H`` otherwise. A
  plaintext weight is real, and (a + ib) * w = aw + i bw, so both samples of a
  slot go through the same multiply-accumulate without mixing: every
  ciphertext carries N real values instead of N/2.
* Each ciphertext ("block") holds ``F = slots // H`` consecutive features for
  all rows: feature ``f_local`` of row ``p`` is slot ``f_local * H + p``.
  ``ceil(in_features / F)`` blocks hold the activations; features past
  ``in_features`` and slots past ``F * H`` are zero.
* Forward, class k: the server sums block_c * W[k, block_c repeated per row]
  over the blocks -> one ciphertext per class whose slot (f_local, p) is a
  partial dot product; the hospital adds the F partial sums of each row after
  decrypting. No rotation, hence no Galois keys and no key switching.
* Backward, block c: the hospital sends G[:, k] tiled F times (one ciphertext
  per class); the server sums G_k * (the same weight plaintexts) over k ->
  one ciphertext per block, the layout of the activations, holding G @ W.

Forward and backward therefore multiply by the very same weight plaintexts,
which the server encodes once per weight version.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .params import HEError

__all__ = ["PackedLayout", "check_positive_fields"]


def check_positive_fields(layout: object, names: tuple[str, ...]) -> None:
    """HEError naming the first of ``names`` that is not a positive integer (layout dataclasses' checks)."""
    for name in names:
        value = getattr(layout, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise HEError(f"{type(layout).__name__}: {name}={value!r} must be a positive integer.")


@dataclass(frozen=True)
class PackedLayout:
    """Slot layout of a linear head ``in_features -> num_classes`` for batches of up to ``batch_size``."""

    in_features: int
    num_classes: int
    batch_size: int
    slots: int

    def __post_init__(self) -> None:
        check_positive_fields(self, ("in_features", "num_classes", "batch_size", "slots"))
        if self.rows > self.slots:
            raise HEError(
                f"PackedLayout: batch_size={self.batch_size} needs {self.rows} slots per feature but a ciphertext "
                f"has {self.slots}; use batch_size <= {2 * self.slots} or a larger poly_modulus_degree."
            )

    @property
    def rows(self) -> int:
        """H: sample pairs (one complex slot holds samples p and p + H)."""
        return (self.batch_size + 1) // 2

    @property
    def features_per_block(self) -> int:
        """F: features per ciphertext."""
        return self.slots // self.rows

    @property
    def n_blocks(self) -> int:
        """Ciphertexts per activation (or activation-gradient) batch."""
        return math.ceil(self.in_features / self.features_per_block)

    @property
    def used_slots(self) -> int:
        return self.features_per_block * self.rows

    def n_ciphertexts(self, kind: str) -> int:
        """How many ciphertexts a message of ``kind`` carries."""
        if kind in ("activations", "activation_grads"):
            return self.n_blocks
        if kind in ("logits", "logit_grads"):
            return self.num_classes
        raise HEError(f"Unknown message kind {kind!r}.")

    def dim(self, kind: str) -> int:
        """Width of the plaintext matrix a message of ``kind`` encrypts."""
        return self.in_features if kind in ("activations", "activation_grads") else self.num_classes

    # -- hospital side: plaintext matrices <-> slot vectors ------------------
    def _pairs(self, m: np.ndarray) -> np.ndarray:
        """(B, n) real -> (H, n) complex: row p = sample p + i * sample p + H."""
        h = self.rows
        full = np.zeros((2 * h, m.shape[1]), dtype=np.float64)
        full[: m.shape[0]] = m
        return full[:h] + 1j * full[h:]

    def _unpairs(self, z: np.ndarray, batch: int) -> np.ndarray:
        """(H, n) complex -> (batch, n) real."""
        return np.concatenate([z.real, z.imag], axis=0)[:batch]

    def pack_activations(self, x: np.ndarray) -> np.ndarray:
        """(B, in_features) -> (n_blocks, slots) complex slot vectors."""
        f, h, nb = self.features_per_block, self.rows, self.n_blocks
        z = np.zeros((h, nb * f), dtype=np.complex128)
        z[:, : self.in_features] = self._pairs(x)
        out = np.zeros((nb, self.slots), dtype=np.complex128)
        out[:, : f * h] = z.T.reshape(nb, f * h)  # slot f_local * H + p
        return out

    def pack_logit_grads(self, g: np.ndarray) -> np.ndarray:
        """(B, num_classes) -> (num_classes, slots): column k tiled once per feature position."""
        z = self._pairs(g).T  # (K, H)
        out = np.zeros((self.num_classes, self.slots), dtype=np.complex128)
        out[:, : self.used_slots] = np.tile(z, (1, self.features_per_block))
        return out

    def unpack_logits(self, slots: np.ndarray, batch: int) -> np.ndarray:
        """(num_classes, slots) partial sums -> (batch, num_classes): sum the F partial sums per row."""
        f, h = self.features_per_block, self.rows
        sums = slots[:, : f * h].reshape(self.num_classes, f, h).sum(axis=1)  # (K, H)
        return self._unpairs(sums.T, batch)

    def unpack_activation_grads(self, slots: np.ndarray, batch: int) -> np.ndarray:
        """(n_blocks, slots) -> (batch, in_features)."""
        f, h, nb = self.features_per_block, self.rows, self.n_blocks
        z = slots[:, : f * h].reshape(nb * f, h).T  # (H, nb * F)
        return self._unpairs(z, batch)[:, : self.in_features]

    # -- server side: weights -> plaintext slot vectors ----------------------
    def weight_blocks(self, weight: np.ndarray) -> np.ndarray:
        """(num_classes, in_features) -> (num_classes, n_blocks, slots) real: W[k, feature] repeated per row."""
        f, h, nb = self.features_per_block, self.rows, self.n_blocks
        padded = np.zeros((self.num_classes, nb * f), dtype=np.float64)
        padded[:, : self.in_features] = weight
        out = np.zeros((self.num_classes, nb, self.slots), dtype=np.float64)
        out[:, :, : f * h] = np.repeat(padded.reshape(self.num_classes, nb, f), h, axis=2)
        return out

    def bias_slots(self, bias: np.ndarray) -> np.ndarray:
        """(num_classes,) -> (num_classes, slots) complex: b_k + i b_k at feature position 0 of every row."""
        out = np.zeros((self.num_classes, self.slots), dtype=np.complex128)
        out[:, : self.rows] = (bias * (1 + 1j))[:, None]
        return out

    def gains(self, weight: np.ndarray) -> tuple[float, float]:
        """Largest sum of |W| feeding one output slot: (forward, backward).

        An output slot of class k adds W[k, f] x[f] over the blocks sharing its
        position (forward) or G[k] W[k, f] over the classes (backward), so
        |slot| <= gain * max|input|: what the range check needs.
        """
        f, nb = self.features_per_block, self.n_blocks
        padded = np.zeros((self.num_classes, nb * f), dtype=np.float64)
        padded[:, : self.in_features] = np.abs(weight)
        per = padded.reshape(self.num_classes, nb, f)
        return float(per.sum(axis=1).max()), float(per.sum(axis=0).max())
