"""The server of ``split-he-full``: its head is ciphertexts too (:mod:`splitfl.he.encrypted_head`).

Every call takes and returns bytes, as :class:`splitfl.split.server.SplitServer` does, so the
transcript records exactly the server's view. The server holds only the consortium's public
context (public and relinearisation keys) and ``enc(W)``; it never receives a plaintext activation, label,
gradient, learning rate, update or weight. A message that fails its checks raises
before anything changes.
"""
from __future__ import annotations

import struct
from typing import Any, Optional

from splitfl.he.encrypted_head import EncryptedLinearHead, FullHeadLayout
from splitfl.he.keys import load_public_context, params_of
from splitfl.tensors import ProtocolError
from splitfl.transcript import TranscriptRecorder

_MAGIC = b"SFCT"  # a list of SEAL ciphertexts


def pack_ciphertexts(cts: list[bytes]) -> bytes:
    """One message: magic, count, then each ciphertext's length and bytes."""
    return _MAGIC + struct.pack("<I", len(cts)) + b"".join(struct.pack("<Q", len(c)) + c for c in cts)


def unpack_ciphertexts(data: bytes, count: int, what: str) -> list[bytes]:
    """The ``count`` ciphertexts of a message; ProtocolError for a wrong, short or padded message."""
    if len(data) < 8 or data[:4] != _MAGIC:
        raise ProtocolError(f"{what}: not a split-he-full ciphertext list (bad magic or empty payload)")
    (n,) = struct.unpack_from("<I", data, 4)
    if n != count:
        raise ProtocolError(f"{what}: {n} ciphertexts, expected {count}; does the head's layout match?")
    out, offset = [], 8
    for i in range(n):
        if offset + 8 > len(data):
            raise ProtocolError(f"{what}: truncated before ciphertext #{i}")
        (size,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        if offset + size > len(data):
            raise ProtocolError(f"{what}: ciphertext #{i} truncated ({len(data) - offset} of {size} bytes)")
        out.append(data[offset:offset + size])
        offset += size
    if offset != len(data):
        raise ProtocolError(f"{what}: {len(data) - offset} bytes after the last ciphertext")
    return out


def pack_weight_rows(rows: list[list[bytes]]) -> bytes:
    """``enc(W)`` as one message: the ``[pair][block]`` ciphertexts, pair of classes by pair."""
    return pack_ciphertexts([ct for row in rows for ct in row])


def unpack_weight_rows(data: bytes, layout: Any) -> list[list[bytes]]:
    """The ``[pair][block]`` ciphertexts of :func:`pack_weight_rows` for a ``FullHeadLayout``."""
    nb = layout.n_blocks
    flat = unpack_ciphertexts(data, layout.pairs * nb, "encrypted weights")
    return [flat[p * nb:(p + 1) * nb] for p in range(layout.pairs)]


class FullSplitServer:
    """Holds ``enc(W)`` and trains it on ciphertexts; the hospitals refresh and finally release it."""

    def __init__(self, public_context: bytes, in_features: int, num_classes: int, batch_capacity: int,
                 initial_weights: bytes, refresh_every: int, recorder: Optional[TranscriptRecorder] = None) -> None:
        self.context = load_public_context(public_context)
        self.layout = FullHeadLayout(in_features, num_classes, batch_capacity, params_of(self.context).slots)
        weights = unpack_weight_rows(initial_weights, self.layout)
        self.head = EncryptedLinearHead(self.context, self.layout, weights, refresh_every)
        self.recorder = recorder
        if recorder is not None:
            recorder.record("weights_in", initial_weights)

    def _record(self, kind: str, payload: bytes, train: bool) -> None:
        if self.recorder is not None and train:
            self.recorder.record(kind, payload)

    def forward(self, payload: bytes, train: bool = True) -> bytes:
        """``enc(x)`` in, ``enc(partial logits)`` out (one ciphertext per pair of classes)."""
        self._record("activations_in", payload, train)
        cts = unpack_ciphertexts(payload, self.layout.n_blocks, "activations")
        reply = pack_ciphertexts(self.head.forward(cts, train=train))
        self._record("logits_out", reply, train)
        return reply

    def backward(self, payload: bytes, input_grad: bool) -> Optional[bytes]:
        """``[enc(lr G)] + enc(lr dL/dW)`` in: the encrypted weights take their SGD step; ``enc(lr dL/dx)`` out if asked."""
        self._record("logit_grads_in", payload, True)
        cts = unpack_ciphertexts(payload, self.layout.backward_count(input_grad), "backward message")
        grads = self.head.backward(cts, input_grad)
        reply = None if grads is None else pack_ciphertexts(grads)
        if reply is not None:
            self._record("activation_grads_out", reply, True)
        if self.recorder is not None:
            self.recorder.next_step()
        return reply

    # ------------------------------------------------------------------ refresh and release (key holders)

    def needs_refresh(self) -> bool:
        return self.head.needs_refresh()

    def export_weights(self) -> bytes:
        """``enc(W)`` for the key holders: a refresh, the release, or a checkpoint."""
        return pack_weight_rows(self.head.export_weights())

    def replace_weights(self, payload: bytes) -> None:
        self.head.replace_weights(unpack_weight_rows(payload, self.layout))

    def restore_weights(self, payload: bytes, fresh: bool) -> None:
        """The best epoch's ``enc(W)`` back in place for the final test (see EncryptedLinearHead.restore_weights)."""
        self.head.restore_weights(unpack_weight_rows(payload, self.layout), fresh)

    def end_epoch(self) -> None:
        """Nothing to step: the learning rate is the hospitals' (folded into ``enc(lr G)``)."""

    def has_secret_key(self) -> bool:
        return self.head.has_secret_key()

    def state_dict(self) -> dict[str, Any]:
        state = self.head.state()
        return {**state, "weights": pack_weight_rows(state["weights"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state({**state, "weights": unpack_weight_rows(state["weights"], self.layout)})
