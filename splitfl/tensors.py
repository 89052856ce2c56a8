"""Plaintext tensors on the wire: float32 with a small checked header.

Used for split-plain activations and gradients and for the head updates of
split-he; a malformed message is rejected before it touches any state.
"""
from __future__ import annotations

import struct

import numpy as np
import torch

_MAGIC = b"SFT1"


class ProtocolError(ValueError):
    """A message that does not fit the protocol; the receiver keeps its state."""


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    arr = np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
    header = _MAGIC + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def tensor_from_bytes(data: bytes, what: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """Decode and check a tensor message; ``None`` in ``shape`` matches any size (the batch)."""
    if len(data) < 5 or data[:4] != _MAGIC:
        raise ProtocolError(f"{what}: not a splitfl tensor message (bad magic or empty payload)")
    ndim = data[4]
    if ndim != len(shape):
        got = struct.unpack_from(f"<{ndim}I", data, 5) if len(data) >= 5 + 4 * ndim else "?"
        raise ProtocolError(f"{what}: expected a {len(shape)}-d tensor of shape {shape}, got {ndim}-d {got}")
    if len(data) < 5 + 4 * ndim:
        raise ProtocolError(f"{what}: header of a {ndim}-d tensor is truncated")
    dims = struct.unpack_from(f"<{ndim}I", data, 5)
    for got, want in zip(dims, shape):
        if want is not None and got != want:
            raise ProtocolError(f"{what}: expected shape {shape}, got {dims}; does the head match the encoder?")
    offset = 5 + 4 * ndim
    n = int(np.prod(dims)) if dims else 1
    if len(data) - offset != 4 * n:
        raise ProtocolError(f"{what}: payload has {len(data) - offset} bytes, shape {dims} needs {4 * n} (truncated?)")
    arr = np.frombuffer(data, dtype=np.float32, offset=offset).reshape(dims)
    if not np.isfinite(arr).all():
        raise ProtocolError(f"{what}: contains NaN or infinite values")
    return torch.from_numpy(arr.copy())
