"""The hospital's stub of the server: the same two calls for split-plain and split-he.

A transport turns tensors into messages, calls the server, and turns the
replies back into tensors; it counts the bytes on the wire both ways. The
HE transport holds the consortium's secret context, which never leaves it.
"""
from __future__ import annotations

from typing import Any

import torch

from splitfl.he.encrypted_head import FullHeadHospital
from splitfl.he.parallel import CKKSWorkers
from splitfl.he.linear import PackedLinearHE
from splitfl.he.mlp import PackedMLPHE
from splitfl.he.wire import EncryptedBatch
from splitfl.split.full_server import pack_ciphertexts, pack_weight_rows, unpack_ciphertexts, unpack_weight_rows
from splitfl.split.server import SplitServer
from splitfl.tensors import ProtocolError, tensor_from_bytes, tensor_to_bytes

__all__ = ["FullHETransport", "HETransport", "PlainTransport", "ProtocolError"]


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
        return tensor_from_bytes(reply, "logits", (feats.shape[0], self._num_classes()))

    def _num_classes(self) -> int:
        """From the server's head: any module with a stage cut, else its (possibly remote) affine layers."""
        layers = self.server.layers
        return layers[-1].out_features if layers else self.server.num_classes

    def backward(self, grad_logits: torch.Tensor, feats_shape: tuple[int, ...]) -> torch.Tensor:
        """The server updates its head from the saved activations and returns dL/d(activations)."""
        msg = tensor_to_bytes(grad_logits)
        self._send(msg)
        reply = self.server.backward(msg)
        self._receive(reply)
        return tensor_from_bytes(reply, "activation gradient", tuple(feats_shape))


class HETransport(_Counting):
    """split-he: CKKS ciphertexts up and down, layer by layer; only the aggregated head update is plaintext."""

    def __init__(self, server: SplitServer, secret_context: Any, batch_capacity: int) -> None:
        super().__init__(server)

        if server.he is None:
            raise ProtocolError("split-he transport needs a server in 'he' mode")
        self.ctx = secret_context
        self.capacity = batch_capacity
        self.workers: CKKSWorkers | None = None  # the hospital's CKKS processes (split.he_workers), if any
        # The hospital's own packing objects, built from public facts (shapes, slots), not taken from the server.
        self.layers = [PackedLinearHE(l.in_features, l.out_features, batch_capacity, server.he.slots) for l in server.layers]

    def _chunks(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(t.detach().cpu().float(), self.capacity, dim=0))

    def forward(self, inputs: torch.Tensor, train: bool = True, layer: int = 0) -> torch.Tensor:
        """Encrypted inputs of one affine layer up, its decrypted outputs back."""

        he, outs = self.layers[layer], []
        for chunk in self._chunks(inputs):
            msg = he.encrypt_activations(self.ctx, chunk, self.workers).to_bytes()
            self._send(msg)
            reply = self.server.forward(msg, train=train, layer=layer)
            self._receive(reply)
            enc = EncryptedBatch.from_bytes(self.ctx, reply, expect_kind="logits", expect_batch=len(chunk))
            outs.append(he.decrypt_logits(self.ctx, enc, workers=self.workers))
        return torch.cat(outs).to(inputs.device, torch.float32)

    def input_grad(self, grad_out: torch.Tensor, layer: int) -> torch.Tensor:
        """Encrypted dL/d(output of a layer) up, decrypted dL/d(its input) back (pre-update weights)."""

        he, outs = self.layers[layer], []
        for chunk in self._chunks(grad_out):
            msg = he.encrypt_logit_grads(self.ctx, chunk, self.workers).to_bytes()
            self._send(msg)
            reply = self.server.backward(msg, layer=layer)
            self._receive(reply)
            enc = EncryptedBatch.from_bytes(self.ctx, reply, expect_kind="activation_grads", expect_batch=len(chunk))
            outs.append(he.decrypt_activation_grads(self.ctx, enc, workers=self.workers))
        return torch.cat(outs).to(grad_out.device, torch.float32)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of a polynomial MLP head in one round trip per chunk (see SplitServer.predict)."""

        srv = self.server.he_mlp
        if srv is None:
            raise ProtocolError("non-interactive prediction needs an MLP head with a polynomial activation")
        he = PackedMLPHE(srv.in_features, srv.hidden, srv.num_classes, self.capacity, self.server.he.slots, srv.coeffs)
        outs = []
        for chunk in self._chunks(inputs):
            msg = he.encrypt_activations(self.ctx, chunk).to_bytes()
            self._send(msg)
            reply = self.server.predict(msg)
            self._receive(reply)
            outs.append(he.decrypt_logits(self.ctx, EncryptedBatch.from_bytes(self.ctx, reply)))
        return torch.cat(outs).to(inputs.device, torch.float32)

    def send_update(self, flat_update: torch.Tensor) -> None:
        msg = tensor_to_bytes(flat_update)
        self._send(msg)
        self.server.apply_update(msg)


class FullHETransport(_Counting):
    """split-he-full: the hospitals' side of an encrypted head (they hold the key; the server, ciphertexts only).

    Batches above the layout's capacity (evaluation) travel in chunks; the learning rate is folded into
    the encrypted logit gradient; refreshes and the release of the head go through the key holders here.
    """

    def __init__(self, server: Any, secret_context: Any, workers: CKKSWorkers | None = None) -> None:
        super().__init__(server)
        self.hospital = FullHeadHospital(secret_context, server.layout, workers)
        self.capacity = server.layout.batch_size
        self._x: torch.Tensor | None = None  # the last training batch's activations, for its update

    def forward(self, feats: torch.Tensor, train: bool = True) -> torch.Tensor:
        if train and len(feats) > self.capacity:
            raise ProtocolError(f"a training batch of {len(feats)} exceeds the encrypted head's capacity {self.capacity}")
        out = []
        if train:  # the hospital forms this batch's update itself (FullHeadHospital.encrypt_update)
            self._x = feats.detach().cpu().double()
        for chunk in feats.detach().cpu().double().split(self.capacity):
            msg = pack_ciphertexts(self.hospital.encrypt_activations(chunk))
            self._send(msg)
            reply = self.server.forward(msg, train=train)
            self._receive(reply)
            cts = unpack_ciphertexts(reply, self.server.layout.pairs, "logits")
            out.append(self.hospital.decrypt_logits(cts, len(chunk)))
        return torch.cat(out).float()

    def backward(self, grad_logits: torch.Tensor, lr: float, input_grad: bool) -> torch.Tensor | None:
        """Send ``enc(lr dL/dW)`` (and ``enc(lr G)`` when the encoder trains); dL/dx back in that case."""
        if self._x is None or len(self._x) != len(grad_logits):
            raise ProtocolError("backward without the training forward of the same batch")
        x, self._x = self._x, None
        g = grad_logits.detach().cpu().double()
        cts = self.hospital.encrypt_logit_grads(g) if input_grad else []
        msg = pack_ciphertexts(cts + self.hospital.encrypt_update(g, x, lr))
        self._send(msg)
        reply = self.server.backward(msg, input_grad=input_grad)  # by name: a gRPC stub's 2nd argument is the layer
        if reply is None:
            return None
        self._receive(reply)
        cts = unpack_ciphertexts(reply, self.server.layout.n_blocks, "activation gradients")
        return self.hospital.decrypt_activation_grads(cts, len(grad_logits)).float()

    def refresh_if_needed(self) -> bool:
        """Decrypt and re-encrypt the worn head when the server asks for it (counted by the server)."""
        if not self.server.needs_refresh():
            return False

        msg = pack_weight_rows(self.hospital.encrypt_weights(*self.release()))
        self._send(msg)
        self.server.replace_weights(msg)
        return True

    def restore(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Put a released head (the best epoch's) back on the server, freshly encrypted; not a refresh."""

        self.server.restore_weights(pack_weight_rows(self.hospital.encrypt_weights(weight, bias)), fresh=True)

    def release(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key holders decrypt the server's head: (weight, bias) in plaintext, at the hospitals only."""

        data = self.server.export_weights()
        self._receive(data)
        return self.hospital.decrypt_weights(unpack_weight_rows(data, self.server.layout))
