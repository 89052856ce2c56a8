"""The hospital's stub of the server: the same two calls for split-plain and split-he.

A transport turns tensors into messages, calls the server, and turns the
replies back into tensors; it counts the bytes on the wire both ways. The
HE transport holds the consortium's secret context, which never leaves it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from splitfl.split.server import SplitServer
from splitfl.split.tensors import ProtocolError, tensor_from_bytes, tensor_to_bytes

__all__ = ["PlainTransport", "HETransport", "ProtocolError"]


class _Counting:
    def __init__(self, server: SplitServer) -> None:
        self.server = server
        self.bytes_up = 0
        self.bytes_down = 0

    def _send(self, payload: bytes) -> None:
        self.bytes_up += len(payload)

    def _receive(self, payload: bytes) -> None:
        self.bytes_down += len(payload)


class PlainTransport(_Counting):
    """split-plain: activations and gradients travel as plaintext float32."""

    def forward(self, feats: torch.Tensor, train: bool = True) -> torch.Tensor:
        msg = tensor_to_bytes(feats)
        self._send(msg)
        reply = self.server.forward(msg, train=train)
        self._receive(reply)
        return tensor_from_bytes(reply, "logits", (feats.shape[0], self.server.head.out_features))

    def backward(
        self, grad_logits: torch.Tensor, feats: torch.Tensor, head_update: Optional[torch.Tensor], need_input_grad: bool = True
    ) -> torch.Tensor:
        """The server updates its head from the saved activations and returns dL/d(activations)."""
        msg = tensor_to_bytes(grad_logits)
        self._send(msg)
        reply = self.server.backward(msg)
        self._receive(reply)
        return tensor_from_bytes(reply, "activation gradient", tuple(feats.shape))


class HETransport(_Counting):
    """split-he: CKKS ciphertexts up and down; only the aggregated head update is plaintext."""

    def __init__(self, server: SplitServer, secret_context: Any, batch_capacity: int) -> None:
        super().__init__(server)
        from splitfl.he.linear import PackedLinearHE

        self.ctx = secret_context
        self.capacity = batch_capacity
        self.he = server.he if server.he is not None else None
        if self.he is None:
            raise ProtocolError("split-he transport needs a server in 'he' mode")
        # The hospital's own packing object, built from public facts (shapes, slots), not from the server.
        self.he = PackedLinearHE(server.head.in_features, server.head.out_features, batch_capacity, server.he.slots)

    def _chunks(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(t, self.capacity, dim=0))

    def forward(self, feats: torch.Tensor, train: bool = True) -> torch.Tensor:
        from splitfl.he.wire import EncryptedBatch

        outs = []
        for chunk in self._chunks(feats.detach().cpu()):
            msg = self.he.encrypt_activations(self.ctx, chunk).to_bytes()
            self._send(msg)
            reply = self.server.forward(msg, train=train)
            self._receive(reply)
            enc = EncryptedBatch.from_bytes(self.ctx, reply, expect_kind="logits", expect_batch=len(chunk))
            outs.append(self.he.decrypt_logits(self.ctx, enc))
        return torch.cat(outs).to(feats.device, torch.float32)

    def backward(
        self, grad_logits: torch.Tensor, feats: torch.Tensor, head_update: Optional[torch.Tensor], need_input_grad: bool = True
    ) -> Optional[torch.Tensor]:
        """Encrypted dL/d(logits) up, encrypted dL/d(activations) down (computed with the pre-update head),
        then the plaintext aggregated head update."""
        from splitfl.he.wire import EncryptedBatch

        outs = []
        for chunk in (self._chunks(grad_logits.detach().cpu()) if need_input_grad else []):
            msg = self.he.encrypt_logit_grads(self.ctx, chunk).to_bytes()
            self._send(msg)
            reply = self.server.backward(msg)
            self._receive(reply)
            enc = EncryptedBatch.from_bytes(self.ctx, reply, expect_kind="activation_grads", expect_batch=len(chunk))
            outs.append(self.he.decrypt_activation_grads(self.ctx, enc))
        if head_update is None:
            raise ProtocolError("split-he needs the hospital's head update")
        msg = tensor_to_bytes(head_update)
        self._send(msg)
        self.server.apply_update(msg)
        return torch.cat(outs).to(feats.device, torch.float32) if outs else None
