"""One training step of the encrypted head, split-he and split-he-full, as the hospital and server run it.

Both parties live in one process and talk through the wire format (bytes), so a step's time is everything
but the network. Shared by ``splitfl bench he-head`` (the floor, the widths sweep) and its tests:

* :class:`SplitHEStep`: split-he. The hospital encrypts the activations; the server encodes the current
  (plaintext) weights and returns encrypted logits; the hospital decrypts, takes the loss gradient, sends it
  encrypted for ``dL/dx`` and the batch-aggregated plaintext update, which the server applies.
* :class:`FullHEStep`: split-he-full. The weights are ciphertexts too; the hospital sends ``enc(x)``, then
  ``enc(lr G)`` (for ``dL/dx``) and ``enc(lr dL/dW)`` in the weights' layout, which the server adds.

Each exposes ``step()`` and its parts, the :class:`~splitfl.he.keys.SealEngine` objects both parties compute
with (for :class:`~splitfl.he.opcount.OpCounter`), and the bytes each message took.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from splitfl.he.encrypted_head import EncryptedLinearHead, FullHeadHospital, FullHeadLayout, full_public_context_bytes
from splitfl.he.keys import SealEngine, create_secret_context, engine_for, load_public_context, public_context_bytes
from splitfl.he.linear import PackedLinearHE
from splitfl.he.parallel import CKKSWorkers
from splitfl.he.params import get_preset
from splitfl.he.wire import EncryptedBatch
from splitfl.tensors import tensor_from_bytes, tensor_to_bytes

__all__ = ["FullHEStep", "SplitHEStep", "StepData"]


class StepData:
    """A fixed batch (x, y) and an initial head, seeded: both protocols train on the same numbers."""

    def __init__(self, dim: int, classes: int, batch: int, seed: int = 0, lr: float = 0.05) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim, self.classes, self.batch, self.lr = dim, classes, batch, lr
        self.x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, classes, (batch,), generator=g)
        self.w0 = torch.randn(classes, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.b0 = torch.zeros(classes, dtype=torch.float64)

    def logit_grad(self, logits: torch.Tensor) -> torch.Tensor:
        """dL/dlogits of the mean cross-entropy (what autograd hands the hospital)."""
        z = logits.double().clone().requires_grad_(True)
        F.cross_entropy(z, self.y).backward()
        assert z.grad is not None
        return z.grad

    def plain_sgd(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The head after ``steps`` plaintext SGD steps on this batch: the reference for the encrypted head."""
        w, b = self.w0.clone(), self.b0.clone()
        for _ in range(steps):
            grad = self.logit_grad(F.linear(self.x, w, b))
            w, b = w - self.lr * grad.T @ self.x, b - self.lr * grad.sum(0)
        return w, b


class SplitHEStep:
    """split-he: encrypted activations and gradients, plaintext weights re-encoded after every update."""

    def __init__(self, data: StepData, preset: str = "default", workers: int = 1) -> None:
        """``workers`` > 1: the hospital and the server each spread their CKKS work over that many processes."""
        self.data, self.params = data, get_preset(preset)
        self.ctx = create_secret_context(self.params)
        self.pub = load_public_context(public_context_bytes(self.ctx))
        self.head = PackedLinearHE(data.dim, data.classes, data.batch, self.params.slots)
        self.hospital_workers = CKKSWorkers(self.ctx, workers) if workers > 1 else None
        self.server_workers = CKKSWorkers(self.pub, workers) if workers > 1 else None
        self.w, self.b = data.w0.float().clone(), data.b0.float().clone()
        self.bytes: dict[str, int] = {}
        self._logits: Optional[torch.Tensor] = None

    @property
    def engines(self) -> tuple[SealEngine, SealEngine]:
        return engine_for(self.ctx), engine_for(self.pub)

    def forward(self) -> torch.Tensor:
        """Hospital encrypts, server encodes the weights and computes, hospital decrypts: the logits."""
        d = self.data
        hw, sw = self.hospital_workers, self.server_workers
        up = self.head.encrypt_activations(self.ctx, d.x.float(), hw).to_bytes()
        reply = self.head.forward(EncryptedBatch.from_bytes(self.pub, up, expect_kind="activations"), self.w, self.b,
                                  sw)
        down = reply.to_bytes()
        self.bytes.update(activations=len(up), logits=len(down))
        return self.head.decrypt_logits(self.ctx, EncryptedBatch.from_bytes(self.ctx, down), dtype=torch.float64,
                                        workers=hw)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """Hospital encrypts dL/dlogits, server multiplies by W, hospital decrypts dL/dx."""
        hw, sw = self.hospital_workers, self.server_workers
        up = self.head.encrypt_logit_grads(self.ctx, grad.float(), hw).to_bytes()
        back = self.head.backward_input(EncryptedBatch.from_bytes(self.pub, up), self.w, sw).to_bytes()
        self.bytes.update(logit_grads=len(up), activation_grads=len(back))
        return self.head.decrypt_activation_grads(self.ctx, EncryptedBatch.from_bytes(self.ctx, back),
                                                  dtype=torch.float64, workers=hw)

    def update(self, grad: torch.Tensor) -> None:
        """The hospital's batch-aggregated plaintext update, on the wire, applied by the server."""
        d = self.data
        msg = tensor_to_bytes(torch.cat([grad.T @ d.x, grad.sum(0)[:, None]], dim=1).float())
        u = tensor_from_bytes(msg, "head update", (d.classes, d.dim + 1))
        self.bytes["update"] = len(msg)
        self.w -= d.lr * u[:, : d.dim]
        self.b -= d.lr * u[:, d.dim]

    def step(self) -> None:
        grad = self.data.logit_grad(self.forward())
        self.backward(grad)
        self.update(grad)

    def close(self) -> None:
        for pool in (self.hospital_workers, self.server_workers):
            if pool is not None:
                pool.close()

    def parts(self) -> dict[str, Callable[[], Any]]:
        """The timed pieces: forward round, backward round (on a fixed gradient), the whole training step."""
        grad = self.data.logit_grad(F.linear(self.data.x, self.data.w0, self.data.b0))

        def forward() -> None:  # as after an optimizer step: a new weight version, encoded in the round
            self.w += 1e-7
            self.forward()

        return {"forward": forward, "backward": lambda: self.backward(grad), "step": self.step}


class FullHEStep:
    """split-he-full: the head is ``enc(W)``; the hospital sends ``enc(lr dL/dW)`` in the weights' layout."""

    def __init__(self, data: StepData, preset: str = "full", input_grad: bool = True, workers: int = 1) -> None:
        """``workers`` > 1: the hospital spreads its encryptions and decryptions over that many processes."""
        self.data, self.params, self.input_grad = data, get_preset(preset), input_grad
        self.ctx = create_secret_context(self.params)
        self.layout = FullHeadLayout(data.dim, data.classes, data.batch, self.params.slots)
        self.pub = load_public_context(full_public_context_bytes(self.ctx, self.layout))
        self.hospital_workers = CKKSWorkers(self.ctx, workers) if workers > 1 else None
        self.hospital = FullHeadHospital(self.ctx, self.layout, self.hospital_workers)
        self.server = EncryptedLinearHead(self.pub, self.layout, self.hospital.encrypt_weights(data.w0, data.b0),
                                          refresh_every=10**9)
        self.bytes: dict[str, int] = {}

    @property
    def engines(self) -> tuple[SealEngine, SealEngine]:
        return engine_for(self.ctx), engine_for(self.pub)

    def forward(self) -> torch.Tensor:
        up = self.hospital.encrypt_activations(self.data.x)
        down = self.server.forward(up)
        self.bytes.update(activations=sum(map(len, up)), logits=sum(map(len, down)))
        return self.hospital.decrypt_logits(down, self.data.batch)

    def backward(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        d = self.data
        cts = self.hospital.encrypt_logit_grads(grad) if self.input_grad else []
        update = self.hospital.encrypt_update(grad, d.x, d.lr)
        dx = self.server.backward(cts + update, self.input_grad)
        self.bytes.update(logit_grads=sum(map(len, cts)), update=sum(map(len, update)),
                          activation_grads=sum(map(len, dx or [])))
        return None if dx is None else self.hospital.decrypt_activation_grads(dx, d.batch)

    def step(self) -> None:
        self.backward(self.data.logit_grad(self.forward()))

    def parts(self) -> dict[str, Callable[[], Any]]:
        return {"step": self.step}

    def close(self) -> None:
        if self.hospital_workers is not None:
            self.hospital_workers.close()

    def weight_error(self) -> float:
        """max |decrypted head - plaintext SGD| after the updates the server has applied (every one on the batch)."""
        ref_w, ref_b = self.data.plain_sgd(self.server.updates)
        w, b = self.hospital.decrypt_weights(self.server.export_weights())
        return float(max((w - ref_w).abs().max(), (b - ref_b).abs().max()))
