"""Top-k sparsification with error feedback, to cut upload bandwidth.

Each site sends only the k largest-magnitude coordinates of its update and
keeps the rest as a residual that is added to its next update (error
feedback, Stich et al. 2018; Karimireddy et al. 2019), so nothing is lost,
only delayed. The wire form is (int32 indices, float32 values).
"""
from __future__ import annotations

import math
import struct

import numpy as np

_MAGIC = b"SFTK"
_HEADER = struct.Struct("<4sII")  # magic, vector length, k


class TopKCompressor:
    """One site's sparsifier; its residual persists across rounds (and checkpoints)."""

    def __init__(self, size: int, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fed.topk_fraction {fraction} must be in (0, 1]")
        self.size = size
        self.k = max(1, math.ceil(fraction * size))
        self.residual = np.zeros(size, dtype=np.float32)

    def compress(self, update: np.ndarray) -> bytes:
        """Encode the top-k of update + residual; the remainder becomes the new residual."""
        corrected = update.astype(np.float32) + self.residual
        idx = np.argpartition(np.abs(corrected), self.size - self.k)[self.size - self.k :]
        idx.sort()
        values = corrected[idx]
        self.residual = corrected
        self.residual[idx] = 0.0
        return _HEADER.pack(_MAGIC, self.size, self.k) + idx.astype(np.int32).tobytes() + values.astype(np.float32).tobytes()


def decompress(payload: bytes, size: int) -> np.ndarray:
    """The dense update a top-k payload stands for; raises ValueError on a malformed payload."""
    if len(payload) < _HEADER.size:
        raise ValueError("top-k payload is shorter than its header")
    magic, length, k = _HEADER.unpack_from(payload)
    if magic != _MAGIC:
        raise ValueError("not a top-k payload (bad magic)")
    if length != size:
        raise ValueError(f"top-k payload is for a vector of {length}, expected {size}")
    if len(payload) != _HEADER.size + 8 * k:
        raise ValueError(f"top-k payload holds {len(payload) - _HEADER.size} bytes, expected {8 * k} for k={k}")
    idx = np.frombuffer(payload, dtype=np.int32, count=k, offset=_HEADER.size)
    values = np.frombuffer(payload, dtype=np.float32, count=k, offset=_HEADER.size + 4 * k)
    if k and (idx.min() < 0 or idx.max() >= size or np.any(np.diff(idx) <= 0)):
        raise ValueError("top-k payload has indices out of range or not strictly increasing")
    dense = np.zeros(size, dtype=np.float32)
    dense[idx] = values
    return dense
