"""split-he-full: a linear head whose weights are CKKS ciphertexts too, trained by SGD on ciphertexts.

In ``split-he`` the server multiplies encrypted activations by *plaintext* weights and receives a
batch-aggregated plaintext update. Here the server holds ``enc(W)`` under the consortium's key and
never sees a plaintext activation, label, gradient or weight:

* **forward** — the hospital sends ``enc(x)``; the server returns ``enc(partial logits)`` = sum over
  blocks of ``enc(x_c) * enc(W_kc)`` (ciphertext x ciphertext, relinearised, rescaled). The hospital
  decrypts and adds the ``F`` partial sums of each sample (a reduction that may happen after decryption).
* **backward** — the hospital sends ``enc(lr * G)`` with ``G = dL/dlogits`` (the learning rate folded in,
  so the server needs no plaintext scalar). The server computes ``enc(lr * G_k * x_c)`` per slot and sums
  it over the batch *on ciphertexts* with ``log2(B)`` rotations, which leaves ``lr * dL/dW[k, f]`` in
  every sample's slot of feature ``f`` — exactly the layout of ``enc(W_kc)`` — and subtracts it. For
  encoder fine-tuning it also returns ``enc(G @ W)`` (``dL/dx``), computed with the weights *before* the
  update, as autograd does.

**Layout** (:class:`FullHeadLayout`): real slots, sample-major: slot ``i * F + f`` holds feature ``f`` of
sample ``i`` in a block of ``F = slots / B`` features, ``B`` a power of two. A constant-1 feature carries
the bias, so ``W`` includes it as its last column. Because ``B * F`` fills the slot vector, a cyclic
rotation by ``F * 2^j`` moves every sample to another sample's position of the *same* feature, and
``log2(B)`` rotate-and-add steps sum over the batch and broadcast the sum to every sample at once.
Complex packing (two samples per slot, as in ``split-he``) is not used: a ciphertext x ciphertext
product of complex slots mixes the two samples.

**Levels and scale.** Fresh ciphertexts sit at the top data level ``L``; the weights live one level
lower, at ``L - 1``: each update ``enc(lr G) * enc(x)`` is made from *fresh* inputs, so after one
rescale it lands at ``L - 1`` and is subtracted there; the weights never lose another level, however
many updates they take. Forward and input gradient multiply the weights (level ``L - 1``) and rescale
once more, so the ``"full"`` preset has two rescaling primes. Scales are kept *exact*, never reset:
the hospital encrypts ``lr * G`` at the scale ``q`` of the prime the first rescale drops, so
``scale(lr G) * scale(x) / q`` is exactly the weights' scale and the update subtracts without any
approximation; forward and input-gradient outputs carry their exact scale, which decoding uses.
What does grow is the error the weights accumulate, one product and its batch sum per update.

**The batch sum's fixed error, and how it is cancelled.** Each rotation key-switches, and SEAL's key
switching splits ``c1`` into RNS digits taken in ``[0, q_j)``, not centred. Their mean ``q_j / 2`` leaves a
*fixed* term, about ``(q_j / 2P) * (1 + x + ... + x^(N-1)) * e_j`` with ``e_j`` the Galois key's error and
``P`` the special prime. It depends neither on the data nor on the encryption's randomness, it is large
only for data primes as big as ``P`` (the 60-bit base prime here), and the all-ones polynomial puts it in a
handful of slots, slot 0 the worst: ~1.6e-9 there per rotation at the weights' scale 2^50. Every update
subtracted it again with the same sign, so the weights drifted *linearly*, ~2.2e-9 per update, at exactly
the slots the release reads. Because the term is the same for every ciphertext at one level, the server
cancels it: each update it also batch-sums a fresh public-key encryption of zero (the same rotations, one
ladder next to the update's ``K * blocks``) and adds that back. What is left is fresh noise each update, so
the error grows like a random walk: on a 32 -> 2 head at batch 8, 1000 updates leave 3.1e-9 where the
uncancelled sum left 2.9e-6 (``splitfl bench he-head --full-drift 1000``, both side by side). Rotating
before the rescale, at scale ``q * 2^50``, would divide the term by ``q`` instead (1.4e-10 after 600
updates in a probe), but every rotation would then work on three primes, not two: the update costs 1.45x.
:meth:`EncryptedLinearHead.needs_refresh` still asks the key holders to decrypt and re-encrypt the weights
once a budget of updates is spent (:data:`DEFAULT_REFRESH_EVERY`), and
:attr:`EncryptedLinearHead.refreshes` counts how often that happened.

**Rotations** go through SEAL's ``Evaluator.rotate_vector`` (TenSEAL's low-level ``sealapi``) with Galois
keys for exactly the ``log2(B)`` steps, generated from the secret key by the hospitals. They are
sequential (each adds into the next), so they cannot be hoisted, and SEAL's public API has no hoisting;
what is batched instead is relinearisation and rescaling: a sum of products is relinearised and rescaled
once, not once per product.
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
from .mlp import _eval_keys, _rotate_and_sum, mlp_public_context_bytes
from .packing import check_positive_fields
from .params import HEError

__all__ = ["DEFAULT_REFRESH_EVERY", "EncryptedLinearHead", "FullHeadLayout", "FullHeadHospital",
           "full_public_context_bytes"]

# Updates between two refreshes of the encrypted weights (decrypt + re-encrypt at a key holder). With the
# batch sum's key-switching error cancelled, 1000 updates leave the weights ~3e-9 from plaintext SGD
# (measured: splitfl bench he-head --full-drift 1000; 2.9e-6 uncancelled), far below what SGD's steps change.
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
        b = self.batch_size
        if b & (b - 1) or b > self.slots:
            raise HEError(f"FullHeadLayout: batch_size={b} must be a power of two <= {self.slots} (the batch sum "
                          "uses log2(batch) rotations); pad the batch or pick 32, 64, 128 ...")

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

    def rotation_steps(self) -> list[int]:
        """Rotations of the batch sum: F, 2F, 4F, ... (B / 2) F."""
        f = self.features_per_block
        return [f << j for j in range(int(math.log2(self.batch_size)))]

    # -- plaintext matrices <-> slot vectors (key holders only) ------------------
    def _blocks(self, m: np.ndarray) -> np.ndarray:
        """(B', features) -> (n_blocks, slots): slot i * F + f of block c = m[i, c * F + f]."""
        f, nb, b = self.features_per_block, self.n_blocks, self.batch_size
        full = np.zeros((b, nb * f))
        full[: m.shape[0], : m.shape[1]] = m
        return full.reshape(b, nb, f).transpose(1, 0, 2).reshape(nb, b * f)

    def pack_activations(self, x: np.ndarray) -> np.ndarray:
        """(B', in_features) -> (n_blocks, slots), with the bias's 1 for every real sample."""
        if x.ndim != 2 or x.shape[1] != self.in_features or x.shape[0] > self.batch_size:
            raise HEError(f"activations of shape {x.shape}: expected (<= {self.batch_size}, {self.in_features})")
        return self._blocks(np.concatenate([x, np.ones((x.shape[0], 1))], axis=1))

    def pack_weights(self, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """(K, in_features), (K,) -> (K, n_blocks, slots): W[k, feature] in every sample's slot."""
        w = np.concatenate([weight, bias[:, None]], axis=1)
        return np.stack([self._blocks(np.repeat(w[k][None], self.batch_size, axis=0)) for k in range(len(w))])

    def pack_logit_grads(self, g: np.ndarray) -> np.ndarray:
        """(B', K) -> (K, slots): g[i, k] in every feature slot of sample i."""
        if g.ndim != 2 or g.shape[1] != self.num_classes or g.shape[0] > self.batch_size:
            raise HEError(f"logit gradients of shape {g.shape}: expected (<= {self.batch_size}, {self.num_classes})")
        f = self.features_per_block
        full = np.zeros((self.batch_size, self.num_classes))
        full[: g.shape[0]] = g
        return np.repeat(full.T, f, axis=1)

    def unpack_logits(self, slots: np.ndarray, batch: int) -> np.ndarray:
        """(K, slots) partial products -> (batch, K): the F partial sums of each sample added."""
        f = self.features_per_block
        return slots.reshape(self.num_classes, self.batch_size, f).sum(axis=2).T[:batch]

    def unpack_activation_grads(self, slots: np.ndarray, batch: int) -> np.ndarray:
        """(n_blocks, slots) -> (batch, in_features)."""
        f, nb, b = self.features_per_block, self.n_blocks, self.batch_size
        return slots.reshape(nb, b, f).transpose(1, 0, 2).reshape(b, nb * f)[:batch, : self.in_features]

    def unpack_weights(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K, n_blocks, slots) -> weight (K, in_features), bias (K,), read from sample 0's slots."""
        f, nb = self.features_per_block, self.n_blocks
        w = slots[:, :, :f].reshape(self.num_classes, nb * f)[:, : self.features]
        return w[:, :-1], w[:, -1]


def full_public_context_bytes(ctx: ts.Context, layout: FullHeadLayout) -> bytes:
    """The server's context: public key, relinearisation keys and the batch-sum Galois keys only (none at batch 1)."""
    steps = layout.rotation_steps()
    if not steps:
        if not ctx.has_relin_keys():
            ctx.generate_relin_keys()
        return public_context_bytes(ctx, relin=True)
    return mlp_public_context_bytes(ctx, steps)


def update_scale(eng: SealEngine) -> float:
    """The scale of ``enc(lr G)``: the last data prime of a fresh ciphertext, which its first rescale removes."""
    return float(eng.context.first_context_data().parms().coeff_modulus()[-1].value())


class FullHeadHospital:
    """The key holders' side: encrypt, decrypt, release and refresh (they hold the consortium's secret key)."""

    def __init__(self, ctx: ts.Context, layout: FullHeadLayout) -> None:
        self.eng = engine_for(ctx)
        if not self.eng.private:
            raise HEError("FullHeadHospital needs the consortium's secret context.")
        if self.eng.slots != layout.slots:
            raise HEError(f"layout has {layout.slots} slots, the context {self.eng.slots}")
        self.layout = layout

    def _encrypt(self, rows: np.ndarray, scale: Optional[float] = None) -> list[bytes]:
        return [self.eng.encrypt(r.astype(np.complex128), scale) for r in rows]

    def encrypt_weights(self, weight: torch.Tensor, bias: torch.Tensor) -> list[list[bytes]]:
        """``[k][c]`` fresh ciphertexts of the initial (or refreshed) weights."""
        packed = self.layout.pack_weights(weight.detach().double().numpy(), bias.detach().double().numpy())
        return [self._encrypt(packed[k]) for k in range(self.layout.num_classes)]

    def encrypt_activations(self, x: torch.Tensor) -> list[bytes]:
        return self._encrypt(self.layout.pack_activations(x.detach().double().cpu().numpy()))

    def encrypt_logit_grads(self, g: torch.Tensor, lr: float) -> list[bytes]:
        """``enc(lr * G)`` at scale q (see the module docstring): the server applies no plaintext scalar."""
        return self._encrypt(self.layout.pack_logit_grads(lr * g.detach().double().cpu().numpy()), update_scale(self.eng))

    def _decrypt(self, cts: list[bytes], what: str) -> np.ndarray:
        return np.stack([np.real(self.eng.decrypt(self.eng.load_ciphertext(ct, f"{what} #{i}")))
                         for i, ct in enumerate(cts)])

    def decrypt_logits(self, cts: list[bytes], batch: int) -> torch.Tensor:
        """(batch, K) logits from the server's partial products."""
        return torch.from_numpy(self.layout.unpack_logits(self._decrypt(cts, "logits"), batch))

    def decrypt_activation_grads(self, cts: list[bytes], batch: int, lr: float) -> torch.Tensor:
        """dL/dx: the server computed ``(lr G) @ W``; the hospital, which chose lr, divides it out."""
        slots = self._decrypt(cts, "activation gradient") / lr
        return torch.from_numpy(self.layout.unpack_activation_grads(slots, batch))

    def decrypt_weights(self, cts: list[list[bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Release: the key holders decrypt the head (at the end of training, or to refresh it)."""
        w, b = self.layout.unpack_weights(np.stack([self._decrypt(row, "weight") for row in cts]))
        return torch.from_numpy(w), torch.from_numpy(b)


class EncryptedLinearHead:
    """The server's head: ``enc(W)`` only, a public context with relinearisation and batch-sum Galois keys."""

    def __init__(self, public_ctx: ts.Context, layout: FullHeadLayout, weights: list[list[bytes]],
                 refresh_every: int = DEFAULT_REFRESH_EVERY, *, cancel_key_switch_error: bool = True) -> None:
        self.eng: SealEngine = engine_for(public_ctx)
        self.cancel_key_switch_error = cancel_key_switch_error  # False only to measure what it saves (the bench)
        if self.eng.levels < 2:
            raise HEError(f"split-he-full needs two rescaling levels (the weights live one level down and are "
                          f"multiplied again); preset {self.eng.params.name!r} has {self.eng.levels}: use "
                          "split.he_preset: full")
        if self.eng.slots != layout.slots:
            raise HEError(f"layout has {layout.slots} slots, the context {self.eng.slots}")
        self.layout = layout
        self.keys = _eval_keys(public_ctx, self.eng, layout.rotation_steps())
        self.refresh_every = int(refresh_every)
        self.updates_since_refresh = 0
        self.updates = 0
        self.refreshes = 0
        self._x: Optional[list[sa.Ciphertext]] = None  # this step's activations, for the update
        self.weights = self._load_weights(weights)

    # -- state ---------------------------------------------------------------
    def _load(self, data: bytes, what: str, scale: Optional[float] = None, parms_id: Optional[list] = None) -> sa.Ciphertext:
        ct = self.eng.load_ciphertext(data, what)
        if ct.parms_id() != (self.eng.first_parms_id if parms_id is None else parms_id):
            raise HEError(f"{what}: at the wrong level (expected {'a fresh ciphertext' if parms_id is None else 'the weights level'})")
        want = self.eng.scale if scale is None else scale
        if ct.scale != want:
            raise HEError(f"{what}: scale {ct.scale!r}, expected {want!r} (encrypt it with FullHeadHospital)")
        return ct

    def _load_weights(self, weights: list[list[bytes]], fresh: bool = True) -> list[list[sa.Ciphertext]]:
        """Fresh encryptions (initial or refreshed weights) or, ``fresh=False``, weights this server exported."""
        lay = self.layout
        if len(weights) != lay.num_classes or any(len(r) != lay.n_blocks for r in weights):
            raise HEError(f"encrypted weights: expected {lay.num_classes} x {lay.n_blocks} ciphertexts")
        out = []
        for k, row in enumerate(weights):
            cts = []
            for c, data in enumerate(row):
                if fresh:
                    ct = self._load(data, f"weight ciphertext [{k}][{c}]")
                    self.eng.evaluator.mod_switch_to_next_inplace(ct)  # the weights live at level L - 1
                else:
                    ct = self._load(data, f"weight ciphertext [{k}][{c}]", parms_id=self.eng.next_parms_id)
                cts.append(ct)
            out.append(cts)
        return out

    def needs_refresh(self) -> bool:
        return self.updates_since_refresh >= self.refresh_every

    def state(self) -> dict[str, object]:
        """Checkpoint: the encrypted weights as this server holds them, and the update and refresh counters."""
        return {"weights": self.export_weights(), "updates": self.updates,
                "updates_since_refresh": self.updates_since_refresh, "refreshes": self.refreshes}

    def load_state(self, state: dict[str, object]) -> None:
        """Resume from :meth:`state` (weights at their level, not fresh encryptions)."""
        self.weights = self._load_weights(state["weights"], fresh=False)  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[arg-type]
        self.updates_since_refresh = int(state["updates_since_refresh"])  # type: ignore[arg-type]
        self.refreshes = int(state["refreshes"])  # type: ignore[arg-type]

    def restore_weights(self, weights: list[list[bytes]], fresh: bool) -> None:
        """Go back to an earlier head (the best epoch's, for the final test), counters kept: not a refresh.

        ``fresh``: the key holders' new encryption of it, or, ``False``, ciphertexts this server exported then.
        """
        self.weights = self._load_weights(weights, fresh)
        if fresh:
            self.updates_since_refresh = 0

    def replace_weights(self, weights: list[list[bytes]]) -> None:
        """A refresh: the key holders' fresh encryption of the (decrypted) weights replaces the worn ones."""
        self.restore_weights(weights, fresh=True)
        self.refreshes += 1

    # -- arithmetic ------------------------------------------------------------
    def _lowered(self, ct: sa.Ciphertext, parms_id: list) -> sa.Ciphertext:
        """``ct`` at the level of ``parms_id`` (a new ciphertext; the input is left as it is)."""
        if ct.parms_id() == parms_id:
            return ct
        out = sa.Ciphertext()
        self.eng.evaluator.mod_switch_to(ct, parms_id, out)
        return out

    def _dot(self, pairs: list[tuple[sa.Ciphertext, sa.Ciphertext]]) -> sa.Ciphertext:
        """Sum of products at the lower level of each pair, relinearised and rescaled once (lazily)."""
        ev, ctx = self.eng.evaluator, self.eng.context
        total: Optional[sa.Ciphertext] = None
        for a, b in pairs:
            la, lb = ctx.get_context_data(a.parms_id()).chain_index(), ctx.get_context_data(b.parms_id()).chain_index()
            a, b = (self._lowered(a, b.parms_id()), b) if la > lb else (a, self._lowered(b, a.parms_id()))
            prod = sa.Ciphertext()
            ev.multiply(a, b, prod)
            if total is None:
                total = prod
            else:
                ev.add_inplace(total, prod)
        assert total is not None
        ev.relinearize_inplace(total, self.keys.relin)
        ev.rescale_to_next_inplace(total)
        return total

    def _batch_sum_bias(self) -> Optional[sa.Ciphertext]:
        """The fixed error of one batch sum, to add back: the batch sum of a fresh public-key ``enc(0)``.

        Made anew for every update (one ladder against the ``K * blocks`` of the update), so what it does not
        cancel is fresh noise that averages out instead of adding up (see the module docstring).
        """
        steps = self.layout.rotation_steps()
        if not steps or not self.cancel_key_switch_error:
            return None
        ref = self.weights[0][0]
        zero = self.eng.encrypt_zero(ref.parms_id(), ref.scale)
        _rotate_and_sum(self.eng.evaluator, zero, steps, self.keys.galois)
        return zero

    def _incoming(self, data: list[bytes], n: int, what: str, scale: Optional[float] = None) -> list[sa.Ciphertext]:
        if len(data) != n:
            raise HEError(f"{what}: expected {n} ciphertexts, got {len(data)}")
        return [self._load(d, f"{what} #{i}", scale) for i, d in enumerate(data)]

    def forward(self, enc_x: list[bytes], train: bool = True) -> list[bytes]:
        """``enc(partial logits)``, one ciphertext per class; keeps ``enc(x)`` for this step's update."""
        x = self._incoming(enc_x, self.layout.n_blocks, "activation")
        out = [self._dot(list(zip(x, wk))) for wk in self.weights]
        if train:
            self._x = x
        return [self.eng.save(ct) for ct in out]

    def backward(self, enc_lr_g: list[bytes], input_grad: bool) -> Optional[list[bytes]]:
        """Apply ``W -= lr dL/dW`` on ciphertexts; return ``enc(dL/dx)`` (with the old weights) if asked."""
        if self._x is None:
            raise HEError("backward without a training forward: send the activations first")
        g = self._incoming(enc_lr_g, self.layout.num_classes, "logit-gradient", update_scale(self.eng))
        grads = None
        if input_grad:  # before the update: autograd's dL/dx uses the weights of the forward pass
            grads = [self._dot([(g[k], self.weights[k][c]) for k in range(len(g))]) for c in range(self.layout.n_blocks)]
        ev, steps, bias = self.eng.evaluator, self.layout.rotation_steps(), self._batch_sum_bias()
        for k, gk in enumerate(g):
            for c, xc in enumerate(self._x):
                step = self._dot([(gk, xc)])  # lr * G[i, k] * x[i, f] in slot i * F + f, exactly at W's scale
                _rotate_and_sum(ev, step, steps, self.keys.galois)  # sum over samples, broadcast to every sample
                ev.sub_inplace(self.weights[k][c], step)
                if bias is not None:  # the key-switching error the batch sum just subtracted, added back
                    ev.add_inplace(self.weights[k][c], bias)
        self._x = None
        self.updates += 1
        self.updates_since_refresh += 1
        return None if grads is None else [self.eng.save(ct) for ct in grads]

    def export_weights(self) -> list[list[bytes]]:
        """The encrypted weights as bytes, for the key holders (release at the end, or a refresh)."""
        return [[self.eng.save(ct) for ct in row] for row in self.weights]

    def has_secret_key(self) -> bool:
        return self.eng.private
