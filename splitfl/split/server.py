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

from splitfl.he.keys import load_public_context, params_of
from splitfl.he.linear import PackedLinearHE
from splitfl.he.parallel import CKKSWorkers
from splitfl.he.mlp import PackedMLPHE
from splitfl.he.wire import EncryptedBatch
from splitfl.tensors import ProtocolError, tensor_from_bytes, tensor_to_bytes
from splitfl.transcript import TranscriptRecorder

Mode = Literal["plain", "he"]


class SplitServer:
    """Holds the head and its optimizer: a linear layer, linear -> activation -> linear or, in plain mode, any module.

    ``plain`` mode: receives activations, returns logits; receives the logit
    gradient, returns the activation gradient and updates its head itself
    (autograd through the whole head: the server sees everything). With a
    stage cut the head is the model's remaining stages, pooling and
    classifier, and the activations are spatial, ``(B, *feature_shape)``.
    ``he`` mode: evaluates each affine layer on ciphertexts under a public
    context (no secret key); between layers of an MLP head the hospital, the
    key holder, applies the activation and re-encrypts, so the server sees
    nothing but ciphertexts. It updates its head from the batch-aggregated,
    optionally clipped and noised, gradient that the hospital sends.
    """

    def __init__(
        self,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Optional[Any],
        mode: Mode,
        public_context: Optional[bytes] = None,
        batch_capacity: int = 64,
        recorder: Optional[TranscriptRecorder] = None,
        feature_shape: Optional[tuple[int, ...]] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        """``feature_shape`` (one sample's activation shape) and ``num_classes`` are needed for a head that is
        not linear (plain mode only, e.g. the remaining stages of a stage cut); a linear head implies them."""
        layers = [head] if isinstance(head, nn.Linear) else list(getattr(head, "linear_layers", lambda: [])())
        if layers:
            implied = ((layers[0].in_features,), layers[-1].out_features)
            if ((feature_shape is not None and tuple(feature_shape) != implied[0])
                    or (num_classes is not None and num_classes != implied[1])):
                raise ProtocolError(f"the linear head takes {implied[0]} and gives {implied[1]} outputs, but "
                                    f"feature_shape={feature_shape}, num_classes={num_classes} were given")
        elif mode != "plain":
            raise ProtocolError(f"the split-he head must be linear or expose linear_layers(), got {type(head).__name__} "
                                "(stage cuts are split-plain only)")
        elif feature_shape is None or num_classes is None:
            raise ProtocolError(f"a {type(head).__name__} head needs feature_shape and num_classes (the boundary checks)")
        else:
            implied = (tuple(int(d) for d in feature_shape), int(num_classes))
        self.head, self.layers = head, layers
        self.feature_shape, self.num_classes = implied
        self.optimizer, self.scheduler, self.mode = optimizer, scheduler, mode
        self.recorder = recorder
        self._saved: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.he_layers: list[Any] = []
        self.context = None
        self.workers: Optional[CKKSWorkers] = None  # the server's CKKS processes (split.he_workers), if any
        if mode == "he":
            if public_context is None:
                raise ProtocolError("split-he server needs the consortium's public context")
            self.context = load_public_context(public_context)
            slots = params_of(self.context).slots
            self.he_layers = [PackedLinearHE(l.in_features, l.out_features, batch_capacity, slots) for l in layers]
            self.he_mlp = None
            coeffs = getattr(getattr(head, "act", None), "coeffs", None)
            if len(layers) == 2 and coeffs is not None and len(coeffs) <= 3:
                self.he_mlp = PackedMLPHE(layers[0].in_features, layers[0].out_features, layers[1].out_features,
                                          batch_capacity, slots, tuple(coeffs))

    @property
    def he(self) -> Any:
        """The packed evaluator of the first layer (None in plain mode)."""
        return self.he_layers[0] if self.he_layers else None

    def _weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        lin = self._layer(layer)
        return lin.weight.detach().cpu(), lin.bias.detach().cpu()

    def _layer(self, layer: int) -> nn.Linear:
        if not 0 <= layer < len(self.layers):
            raise ProtocolError(f"layer {layer} does not exist: the head has {len(self.layers)} affine layer(s)")
        return self.layers[layer]

    def _record(self, kind: str, payload: bytes, train: bool, layer: int = 0) -> None:
        if self.recorder is not None and train:
            self.recorder.record(f"layer{layer}_{kind}" if len(self.layers) > 1 else kind, payload)

    # ------------------------------------------------------------------ forward / backward

    def forward(self, payload: bytes, train: bool = True, layer: int = 0) -> bytes:
        """Activations (plain) or encrypted inputs of one affine layer (HE) in, (encrypted) outputs out."""
        self._record("activations_in", payload, train, layer)
        if self.mode == "plain":
            x = tensor_from_bytes(payload, "activations", (None, *self.feature_shape))
            if train:
                x.requires_grad_(True)
                with torch.enable_grad():
                    out = self.head(x)
                self._saved = (x, out)
                logits = out.detach()
            else:
                with torch.no_grad():
                    logits = self.head(x)
            reply = tensor_to_bytes(logits)
        else:
            lin = self._layer(layer)
            enc = EncryptedBatch.from_bytes(self.context, payload, expect_kind="activations", expect_dim=lin.in_features)
            reply = self.he_layers[layer].forward(enc, *self._weights(layer), self.workers).to_bytes()
        self._record("logits_out", reply, train, layer)
        return reply

    def backward(self, payload: bytes, layer: Optional[int] = None) -> bytes:
        """Output gradient in (plain, or encrypted in HE), input gradient out.

        Plain mode: the gradient of the logits; the server backpropagates
        through its head, updates it and returns dL/d(activations). HE mode:
        the encrypted gradient of one affine layer's output, and the encrypted
        gradient of its input comes back (with the weights the forward used);
        the head update arrives separately (:meth:`apply_update`).
        """
        layer = max(len(self.layers) - 1, 0) if layer is None else layer
        self._record("logit_grads_in", payload, True, layer)
        if self.mode == "plain":
            if self._saved is None:
                raise ProtocolError("backward without a preceding training forward")
            x, out = self._saved
            g = tensor_from_bytes(payload, "logit gradient", tuple(out.shape))
            self.optimizer.zero_grad(set_to_none=True)
            out.backward(g)
            self.optimizer.step()
            self._saved = None
            reply = tensor_to_bytes(x.grad)
        else:
            lin = self._layer(layer)
            enc = EncryptedBatch.from_bytes(self.context, payload, expect_kind="logit_grads", expect_dim=lin.out_features)
            reply = self.he_layers[layer].backward_input(enc, self._weights(layer)[0], self.workers).to_bytes()
        self._record("activation_grads_out", reply, True, layer)
        if self.mode == "plain" and self.recorder is not None:
            self.recorder.next_step()  # in split-he the step ends with the head update
        return reply

    def predict(self, payload: bytes) -> bytes:
        """HE mode, polynomial MLP head: encrypted activations in, encrypted logits out, in one round trip.

        The whole head, activation included, runs on ciphertexts (needs relinearisation and the
        Galois keys of the head's rotation steps in the public context).
        """
        if self.mode != "he" or getattr(self, "he_mlp", None) is None:
            raise ProtocolError("non-interactive prediction needs split-he with an MLP head whose activation is a polynomial")

        enc = EncryptedBatch.from_bytes(self.context, payload, expect_kind="activations", expect_dim=self.layers[0].in_features)
        (w1, b1), (w2, b2) = self._weights(0), self._weights(1)
        return self.he_mlp.forward(enc, w1, b1, w2, b2).to_bytes()

    def update_size(self) -> int:
        """Length of the flat head update: [W_l | b_l] of every affine layer, row-major, in order."""
        return sum(l.out_features * (l.in_features + 1) for l in self.layers)

    def apply_update(self, payload: bytes) -> None:
        """HE mode: the hospital's head gradient, every layer's (out, in+1) block [W | b] flattened."""
        self.step_head(self.read_update(payload))
        if self.recorder is not None:
            self.recorder.next_step()

    def read_update(self, payload: bytes) -> torch.Tensor:
        """A head update as received: recorded, checked against the mode and the head's size, parsed."""
        if self.recorder is not None:
            self.recorder.record("head_update_in", payload)
        if self.mode != "he":
            raise ProtocolError("head updates are sent only in split-he; in split-plain the server computes them")
        return tensor_from_bytes(payload, "head update", (self.update_size(),))

    def step_head(self, flat: torch.Tensor) -> None:
        """One optimizer step of the head on a flat [W | b] gradient (the layout of :meth:`update_size`)."""
        self.optimizer.zero_grad(set_to_none=True)
        offset = 0
        for lin in self.layers:
            k, d = lin.out_features, lin.in_features
            block = flat[offset:offset + k * (d + 1)].view(k, d + 1)
            offset += k * (d + 1)
            lin.weight.grad = block[:, :d].to(lin.weight.device, lin.weight.dtype).clone()
            lin.bias.grad = block[:, d].to(lin.bias.device, lin.bias.dtype).clone()
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
