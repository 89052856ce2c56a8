"""Secure-aggregation primitives: constants, the error type, key derivation, the PRG, fixed point, Shamir.

Everything both sides of the protocol compute the same way lives here, so
that a site and the server derive identical keys and masks: HKDF-SHA256
labels bound to the round and site ids, the AES-256-CTR keystream added
into ``uint64`` vectors, X25519 pairwise mask keys, the fixed-point map
between float updates and Z_2^64, and t-of-n Shamir sharing over
GF(2^521 - 1). It knows nothing about messages or protocol steps, which
is why every other module of the package may import it and it imports none.
"""
from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_FRAC_BITS",
    "PRIME",
    "SecAggError",
    "dequantize",
    "max_abs_input",
    "quantize",
    "self_mask",
    "shamir_reconstruct",
    "shamir_split",
]

PRIME = (1 << 521) - 1  # Mersenne prime; holds the 256-bit secrets with room to spare
_SHARE_BYTES = 66  # ceil(521 / 8)
_SECRET_BYTES = 32  # b_u seeds and X25519 private keys
_KEY_BYTES = 32  # X25519 public keys
_NONCE_BYTES = 12
_MAX_SITE_ID = 0xFFFF_FFFE  # u32 on the wire; site_id + 1 is the Shamir evaluation point
DEFAULT_FRAC_BITS = 32
_PRG_CHUNK = 1 << 17  # uint64 words per keystream chunk (1 MiB): stays in cache while added
_ZEROS = bytes(8 * _PRG_CHUNK)
_INFO = b"splitfl/secagg/v1/"


class SecAggError(ValueError):
    """A secure-aggregation input, message or protocol step is invalid or unsafe to continue."""


# --------------------------------------------------------------------------- helpers


def _check_site_id(site_id: int) -> int:
    if isinstance(site_id, bool) or not isinstance(site_id, (int, np.integer)):
        raise SecAggError(f"site id must be an int, got {type(site_id).__name__}.")
    if not 0 <= int(site_id) <= _MAX_SITE_ID:
        raise SecAggError(f"site id {site_id} is out of range [0, {_MAX_SITE_ID}].")
    return int(site_id)


def _check_round_id(round_id: int) -> int:
    if isinstance(round_id, bool) or not isinstance(round_id, (int, np.integer)) or not 0 <= round_id < 1 << 64:
        raise SecAggError(f"round id must be an int in [0, 2^64), got {round_id!r}.")
    return int(round_id)


def _hkdf(secret: bytes, label: bytes, round_id: int, *ids: int) -> bytes:
    """32-byte key for one purpose, round and (ordered) site tuple: never reused across rounds."""
    info = _INFO + label + struct.pack(f"<Q{len(ids)}I", round_id, *ids)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _pair_ids(u: int, v: int) -> tuple[int, int]:
    return (u, v) if u < v else (v, u)


def _apply_prg(acc: np.ndarray, key: bytes, subtract: bool = False) -> None:
    """acc += PRG(key) (or -=) mod 2^64, in place; AES-256-CTR keystream read as little-endian uint64.

    Each key is used for exactly one stream, so the all-zero counter block is safe.
    """
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    buf = np.empty(8 * _PRG_CHUNK + 15, dtype=np.uint8)  # update_into wants block_size - 1 spare bytes
    op = np.subtract if subtract else np.add
    zeros = memoryview(_ZEROS)
    for start in range(0, acc.size, _PRG_CHUNK):
        stop = min(acc.size, start + _PRG_CHUNK)
        n = 8 * (stop - start)
        enc.update_into(zeros[:n], buf)
        part = acc[start:stop]
        op(part, buf[:n].view("<u8"), out=part)


def self_mask(seed: bytes, site_id: int, round_id: int, length: int) -> np.ndarray:
    """PRG(b_u): the self mask a site adds, as the server recomputes it from the reconstructed seed."""
    out = np.zeros(length, dtype="<u8")
    _apply_prg(out, _hkdf(seed, b"self-mask", round_id, site_id))
    return out


def _pair_mask_key(private: X25519PrivateKey, peer_public: bytes, round_id: int, u: int, v: int) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, b"pair-mask", round_id, *_pair_ids(u, v))


def _share_aad(round_id: int, sender: int, recipient: int) -> bytes:
    return _INFO + b"share" + struct.pack("<QII", round_id, sender, recipient)


# --------------------------------------------------------------------------- fixed point


def max_abs_input(num_sites: int, frac_bits: int) -> float:
    """Largest |x| a site may submit so that the sum of ``num_sites`` inputs cannot wrap Z_2^64.

    Uses 2^62 rather than 2^63 as the bound on the quantised sum, leaving a
    factor-2 margin for rounding.
    """
    return 2.0 ** (62 - frac_bits) / num_sites


def quantize(x: np.ndarray, frac_bits: int, num_sites: int) -> np.ndarray:
    """round(x * 2^frac_bits) as uint64 (two's complement mod 2^64); SecAggError if non-finite or too large."""
    if not 0 <= frac_bits <= 52:
        raise SecAggError(f"frac_bits must be in [0, 52], got {frac_bits}.")
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise SecAggError(f"update must be a real numeric array, got dtype {x.dtype}.")
    if x.dtype not in (np.float32, np.float64):
        # float32 is kept as is: scaling by 2^f is exact and rint of a float32 is a float32, so the result is the same.
        x = x.astype(np.float64)
    peak = max(float(x.max()), -float(x.min())) if x.size else 0.0  # NaN propagates, no |x| temporary
    if not np.isfinite(peak):
        bad = int(x.size - np.isfinite(x).sum())
        raise SecAggError(f"update has {bad} non-finite value(s) (NaN or inf).")
    bound = max_abs_input(num_sites, frac_bits)
    if peak >= bound:
        raise SecAggError(
            f"update has |x| up to {peak:.6g}, but with {num_sites} sites and frac_bits={frac_bits} the "
            f"ring Z_2^64 holds only |x| < {bound:.6g}; lower frac_bits or scale the update."
        )
    scaled = x * x.dtype.type(1 << frac_bits)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.int64).view("<u8")


def dequantize(q: np.ndarray, frac_bits: int) -> np.ndarray:
    """Inverse of :func:`quantize` for a (summed) uint64 vector: signed value / 2^frac_bits as float64."""
    return np.ldexp(np.asarray(q, dtype="<u8").view(np.int64).astype(np.float64), -frac_bits)


# --------------------------------------------------------------------------- Shamir


def shamir_split(secret: int, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """t-of-n Shamir shares of ``secret`` over GF(PRIME), one per evaluation point in ``xs`` (nonzero, distinct)."""
    points = list(xs)
    if not 0 <= secret < PRIME:
        raise SecAggError("secret is outside the Shamir field.")
    if not 1 <= threshold <= len(points):
        raise SecAggError(f"threshold {threshold} is out of range for {len(points)} shares.")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise SecAggError("Shamir evaluation points must be distinct and nonzero.")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def shamir_reconstruct(shares: dict[int, int], threshold: int) -> int:
    """The secret from at least ``threshold`` shares {x: y} (Lagrange interpolation at 0; uses the first t)."""
    if len(shares) < threshold:
        raise SecAggError(f"need {threshold} shares to reconstruct, got {len(shares)}.")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret

