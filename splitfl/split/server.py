"""The server's side of split learning: it owns the head and sees only messages.

Every call takes and returns bytes, exactly what would cross the network, so
the transcript records the server's real view and the gRPC service (later)
can wrap these handlers unchanged. A message that fails validation raises
:class:`ProtocolError` (or the HE layer's ``HEError``) before any state changes.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from splitfl.split.tensors import ProtocolError, tensor_from_bytes, tensor_to_bytes
from splitfl.split.transcript import TranscriptRecorder

Mode = Literal["plain", "he"]


class SplitServer:
    """Holds the linear head (weight K x d, bias K) and its optimizer.

    ``plain`` mode: receives activations, returns logits; receives the logit
    gradient, returns the activation gradient and updates its head itself.
    ``he`` mode: computes on ciphertexts under a public context (no secret
    key) and updates its head from the batch-aggregated, optionally clipped
    and noised, head gradient that the hospital sends.
    """

    def __init__(
        self,
        head: nn.Linear,
        optimizer: torch.optim.Optimizer,
        scheduler: Optional[Any],
        mode: Mode,
        public_context: Optional[bytes] = None,
        batch_capacity: int = 64,
        recorder: Optional[TranscriptRecorder] = None,
    ) -> None:
        if not isinstance(head, nn.Linear):
            raise ProtocolError(f"the server head must be linear for split learning over CKKS, got {type(head).__name__}")
        self.head, self.optimizer, self.scheduler, self.mode = head, optimizer, scheduler, mode
        self.recorder = recorder
        self._saved_activations: Optional[torch.Tensor] = None
        self.he = None
        self.context = None
        if mode == "he":
            from splitfl.he.keys import load_public_context, params_of
            from splitfl.he.linear import PackedLinearHE

            if public_context is None:
                raise ProtocolError("split-he server needs the consortium's public context")
            self.context = load_public_context(public_context)
            self.he = PackedLinearHE(head.in_features, head.out_features, batch_capacity, params_of(self.context).slots)

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight.detach().cpu()

    @property
    def bias(self) -> torch.Tensor:
        return self.head.bias.detach().cpu()

    def _record(self, kind: str, payload: bytes, train: bool) -> None:
        if self.recorder is not None and train:
            self.recorder.record(kind, payload)

    # ------------------------------------------------------------------ forward / backward

    def forward(self, payload: bytes, train: bool = True) -> bytes:
        """Activations (plain) or encrypted activations (HE) in, (encrypted) logits out."""
        self._record("activations_in", payload, train)
        if self.mode == "plain":
            x = tensor_from_bytes(payload, "activations", (None, self.head.in_features))
            with torch.no_grad():
                logits = nn.functional.linear(x, self.weight, self.bias)
            if train:
                self._saved_activations = x
            reply = tensor_to_bytes(logits)
        else:
            from splitfl.he.wire import EncryptedBatch

            enc = EncryptedBatch.from_bytes(self.context, payload, expect_kind="activations", expect_dim=self.head.in_features)
            reply = self.he.forward(enc, self.weight, self.bias).to_bytes()
        self._record("logits_out", reply, train)
        return reply

    def backward(self, payload: bytes) -> bytes:
        """Logit gradient in (plain, or encrypted in HE), activation gradient out.

        In plain mode the server also updates its head here, from the saved
        activations; in HE mode the head update arrives separately
        (:meth:`apply_update`) because the server cannot compute it.
        """
        self._record("logit_grads_in", payload, True)
        if self.mode == "plain":
            if self._saved_activations is None:
                raise ProtocolError("backward without a preceding training forward")
            x = self._saved_activations
            g = tensor_from_bytes(payload, "logit gradient", (x.shape[0], self.head.out_features))
            grad_x = g @ self.weight
            self._step(g.t() @ x, g.sum(0))
            self._saved_activations = None
            reply = tensor_to_bytes(grad_x)
        else:
            from splitfl.he.wire import EncryptedBatch

            enc = EncryptedBatch.from_bytes(self.context, payload, expect_kind="logit_grads", expect_dim=self.head.out_features)
            reply = self.he.backward_input(enc, self.weight).to_bytes()
        self._record("activation_grads_out", reply, True)
        if self.mode == "plain" and self.recorder is not None:
            self.recorder.next_step()  # in split-he the step ends with the head update
        return reply

    def apply_update(self, payload: bytes) -> None:
        """HE mode: the hospital's head gradient, [weight | bias] as one (K, d+1) tensor."""
        self._record("head_update_in", payload, True)
        if self.mode != "he":
            raise ProtocolError("head updates are sent only in split-he; in split-plain the server computes them")
        k, d = self.head.out_features, self.head.in_features
        update = tensor_from_bytes(payload, "head update", (k, d + 1))
        self._step(update[:, :d], update[:, d])
        if self.recorder is not None:
            self.recorder.next_step()

    def _step(self, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.head.weight.grad = grad_weight.to(self.head.weight.device, self.head.weight.dtype)
        self.head.bias.grad = grad_bias.to(self.head.bias.device, self.head.bias.dtype)
        self.optimizer.step()

    def end_epoch(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def has_secret_key(self) -> bool:
        return bool(self.context is not None and self.context.is_private())

