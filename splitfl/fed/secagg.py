"""Pairwise-mask secure aggregation (Bonawitz et al., CCS 2017), semi-honest server.

The cheap alternative to CKKS aggregation for FedAvg: each site adds masks
to its quantised update that cancel in the sum, so the server learns the sum
of the sites' updates and never an individual one. Dropouts are tolerated:
the sites' mask secrets are Shamir-shared t-of-n, so the survivors let the
server remove the masks of sites that vanished mid-round.

Protocol (one instance per training round; fresh keys, ``round_id`` in every
derivation so masks never repeat)::

    round 0  site u -> server  AdvertiseKeys(c_u^PK, s_u^PK)      server -> all  KeyBroadcast
    round 1  site u -> server  ShareKeys: for each v, AES-GCM under HKDF(X25519(c_u, c_v))
                               of (Shamir share of b_u, share of s_u^SK)   server -> v  ShareDelivery
    round 2  site u -> server  MaskedInput y_u = q(x_u) + PRG(b_u)
                               + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)   (mod 2^64)
    round 3  server -> survivors UnmaskRequest(survivors, dropped)
             site u -> server  UnmaskResponse: shares of b_v for survivors,
                               of s_v^SK for dropped sites -- never both for one site
             server: reconstructs, removes PRG(b_v) and the dropped sites' pairwise masks,
                     and de-quantises the sum.

Sets as in the paper: U1 advertised keys, U2 shared keys (pairwise masks are
made with U2), U3 sent masked inputs (the sum is over U3), U4 answered the
unmask round. Each of them needs at least ``threshold`` sites.

Primitives (``cryptography``): X25519 key agreement, HKDF-SHA256, AES-256-GCM
for the shares the server relays, AES-256-CTR as the PRG (keystream read
straight into ``uint64`` in 1 MiB chunks). Shamir sharing is over the
Mersenne prime 2^521 - 1, evaluation point ``site_id + 1``.

Security model and limits: the server and the sites follow the protocol
(semi-honest); no signatures, so an actively malicious server could
impersonate sites; the transport (TLS) authenticates the server. The server
learns the sum over U3 and which sites dropped. ``threshold > num_sites / 2``
is the paper's recommendation; only ``2 <= threshold <= num_sites`` is
enforced.

Messages are plain dataclasses of ints and bytes with ``to_bytes`` /
``from_bytes`` (little-endian, magic ``SFSA``, version, type, round id);
:func:`secure_sum` passes every message through its wire form in-process and
counts the bytes, as the gRPC transport will.
"""
from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_FRAC_BITS",
    "PRIME",
    "ROUNDS",
    "AdvertiseKeys",
    "EncryptedShare",
    "KeyBroadcast",
    "MaskedInput",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "SecureSumResult",
    "ShareDelivery",
    "ShareKeys",
    "SiteKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
    "dequantize",
    "max_abs_input",
    "quantize",
    "secure_sum",
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
# Round names as used in SecureSumResult.sent / .received.
ROUNDS: tuple[str, ...] = ("advertise_keys", "share_keys", "masked_input", "unmask")
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


# --------------------------------------------------------------------------- wire format

_MAGIC = b"SFSA"
_VERSION = 1
_HEAD = struct.Struct("<4sBBQ")  # magic, version, message type, round id


class _Reader:
    """Bounds-checked little-endian reader: truncation and trailing bytes are SecAggErrors."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = memoryview(data), 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise SecAggError(f"{self.what}: message truncated ({len(self.data)} bytes).")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def view(self, n: int) -> memoryview:
        """Like take, without copying (for the large payload)."""
        if self.pos + n > len(self.data):
            raise SecAggError(f"{self.what}: message truncated ({len(self.data)} bytes).")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def u8(self) -> int:
        return self.take(1)[0]

    def count(self, item_bytes: int) -> int:
        """A u32 count, checked against the bytes left so a bogus count cannot make us allocate."""
        n = self.u32()
        if n * item_bytes > len(self.data) - self.pos:
            raise SecAggError(f"{self.what}: declares {n} items but is too short for them.")
        return n

    def done(self) -> None:
        if self.pos != len(self.data):
            raise SecAggError(f"{self.what}: {len(self.data) - self.pos} unexpected trailing bytes.")


def _open(data: bytes, msg_type: int, what: str) -> tuple[_Reader, int]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SecAggError(f"{what}.from_bytes: expected bytes, got {type(data).__name__}.")
    r = _Reader(data, what)
    magic, version, kind, round_id = _HEAD.unpack(r.take(_HEAD.size))
    if magic != _MAGIC:
        raise SecAggError(f"{what}: not a secure-aggregation message (magic {magic!r}).")
    if version != _VERSION:
        raise SecAggError(f"{what}: unsupported format version {version} (expected {_VERSION}).")
    if kind != msg_type:
        raise SecAggError(f"{what}: message type {kind} is not {msg_type}.")
    return r, round_id


def _head(msg_type: int, round_id: int) -> bytes:
    return _HEAD.pack(_MAGIC, _VERSION, msg_type, round_id)


@dataclass(frozen=True)
class SiteKeys:
    """One site's public keys: ``enc_public`` (c_u, encrypts shares) and ``mask_public`` (s_u, masks)."""

    site_id: int
    enc_public: bytes
    mask_public: bytes

    SIZE: ClassVar[int] = 4 + 2 * _KEY_BYTES

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.site_id) + self.enc_public + self.mask_public

    @classmethod
    def read(cls, r: _Reader) -> SiteKeys:
        return cls(r.u32(), r.take(_KEY_BYTES), r.take(_KEY_BYTES))


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, site -> server: the site's two fresh X25519 public keys."""

    round_id: int
    keys: SiteKeys
    TYPE: ClassVar[int] = 1

    @property
    def site_id(self) -> int:
        return self.keys.site_id

    def to_bytes(self) -> bytes:
        return _head(self.TYPE, self.round_id) + self.keys.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        r, round_id = _open(data, cls.TYPE, cls.__name__)
        msg = cls(round_id, SiteKeys.read(r))
        r.done()
        return msg


@dataclass(frozen=True)
class KeyBroadcast:
    """Round 0, server -> sites: everyone's keys (U1) and the parameters of this aggregation."""

    round_id: int
    threshold: int
    vector_length: int
    frac_bits: int
    sites: tuple[SiteKeys, ...]
    TYPE: ClassVar[int] = 2

    def to_bytes(self) -> bytes:
        head = _head(self.TYPE, self.round_id) + struct.pack(
            "<IQBI", self.threshold, self.vector_length, self.frac_bits, len(self.sites)
        )
        return head + b"".join(k.to_bytes() for k in self.sites)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyBroadcast:
        r, round_id = _open(data, cls.TYPE, cls.__name__)
        threshold, length, frac_bits = r.u32(), r.u64(), r.u8()
        sites = tuple(SiteKeys.read(r) for _ in range(r.count(SiteKeys.SIZE)))
        r.done()
        return cls(round_id, threshold, length, frac_bits, sites)


@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM ciphertext of (share of b_sender, share of s_sender^SK) for ``recipient``; relayed by the server."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes

    MIN_SIZE: ClassVar[int] = 12 + _NONCE_BYTES

    def to_bytes(self) -> bytes:
        return (
            struct.pack("<II", self.sender, self.recipient)
            + self.nonce
            + struct.pack("<I", len(self.ciphertext))
            + self.ciphertext
        )

    @classmethod
    def read(cls, r: _Reader) -> EncryptedShare:
        sender, recipient, nonce = r.u32(), r.u32(), r.take(_NONCE_BYTES)
        return cls(sender, recipient, nonce, r.take(r.u32()))


def _shares_bytes(shares: tuple[EncryptedShare, ...]) -> bytes:
    return struct.pack("<I", len(shares)) + b"".join(s.to_bytes() for s in shares)


def _read_shares(r: _Reader) -> tuple[EncryptedShare, ...]:
    return tuple(EncryptedShare.read(r) for _ in range(r.count(EncryptedShare.MIN_SIZE)))


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, site -> server: one encrypted share bundle for every other site in U1."""

    round_id: int
    site_id: int
    shares: tuple[EncryptedShare, ...]
    TYPE: ClassVar[int] = 3

    def to_bytes(self) -> bytes:
        return _head(self.TYPE, self.round_id) + struct.pack("<I", self.site_id) + _shares_bytes(self.shares)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareKeys:
        r, round_id = _open(data, cls.TYPE, cls.__name__)
        msg = cls(round_id, r.u32(), _read_shares(r))
        r.done()
        return msg


@dataclass(frozen=True)
class ShareDelivery:
    """Round 1, server -> site: the share bundles addressed to ``recipient`` from every site in U2."""

    round_id: int
    recipient: int
    shares: tuple[EncryptedShare, ...]
    TYPE: ClassVar[int] = 4

    def to_bytes(self) -> bytes:
        return _head(self.TYPE, self.round_id) + struct.pack("<I", self.recipient) + _shares_bytes(self.shares)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareDelivery:
        r, round_id = _open(data, cls.TYPE, cls.__name__)
        msg = cls(round_id, r.u32(), _read_shares(r))
        r.done()
        return msg


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, site -> server: y_u as little-endian uint64 bytes.

    ``masked`` may be any bytes-like object (the client and ``from_bytes``
    hand over memoryviews), so the 8 x length payload is copied only once,
    into the wire message.
    """

    round_id: int
    site_id: int
    masked: bytes | memoryview
    TYPE: ClassVar[int] = 5

    @property
    def vector(self) -> np.ndarray:
        """y_u as a read-only uint64 view (no copy)."""
        return np.frombuffer(self.masked, dtype="<u8")

    def to_bytes(self) -> bytes:
        return b"".join(
            [_head(self.TYPE, self.round_id), struct.pack("<IQ", self.site_id, len(self.masked) // 8), self.masked]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        r, round_id = _open(data, cls.TYPE, cls.__name__)
        site_id, length = r.u32(), r.u64()
        msg = cls(round_id, site_id, r.view(8 * length))
        r.done()
        return msg


def _ids_bytes(ids: tuple[int, ...]) -> bytes:
    return struct.pack(f"<I{len(ids)}I", len(ids), *ids)


def _read_ids(r: _Reader) -> tuple[int, ...]:
    n = r.count(4)
    return struct.unpack(f"<{n}I", r.take(4 * n))


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3, server -> survivors: who sent masked inputs (U3) and who dropped after sharing (U2 minus U3)."""

    round_id: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    TYPE: ClassVar[int] = 6

    def to_bytes(self) -> bytes:
        return _head(self.TYPE, self.round_id) + _ids_bytes(self.survivors) + _ids_bytes(self.dropped)

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r, round_id = _open(data, cls.TYPE, cls.__name__)
        msg = cls(round_id, _read_ids(r), _read_ids(r))
        r.done()
        return msg


def _share_map_bytes(shares: dict[int, int]) -> bytes:
    return struct.pack("<I", len(shares)) + b"".join(
        struct.pack("<I", owner) + y.to_bytes(_SHARE_BYTES, "little") for owner, y in sorted(shares.items())
    )


def _read_share_map(r: _Reader) -> dict[int, int]:
    out = {}
    for _ in range(r.count(4 + _SHARE_BYTES)):
        owner = r.u32()
        if owner in out:
            raise SecAggError(f"{r.what}: two shares for site {owner}.")
        out[owner] = int.from_bytes(r.take(_SHARE_BYTES), "little")
    return out


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, site -> server: its shares of b_v for survivors and of s_v^SK for dropped sites (keyed by owner v)."""

    round_id: int
    site_id: int
    self_mask_shares: dict[int, int]
    mask_key_shares: dict[int, int]
    TYPE: ClassVar[int] = 7

    def to_bytes(self) -> bytes:
        return (
            _head(self.TYPE, self.round_id)
            + struct.pack("<I", self.site_id)
            + _share_map_bytes(self.self_mask_shares)
            + _share_map_bytes(self.mask_key_shares)
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r, round_id = _open(data, cls.TYPE, cls.__name__)
        msg = cls(round_id, r.u32(), _read_share_map(r), _read_share_map(r))
        r.done()
        return msg


_MESSAGES = {
    m.TYPE: m
    for m in (AdvertiseKeys, KeyBroadcast, ShareKeys, ShareDelivery, MaskedInput, UnmaskRequest, UnmaskResponse)
}


def decode_message(data: bytes):
    """Parse any secure-aggregation message by its type byte (what a transport receiving bytes calls)."""
    if len(data) < _HEAD.size:
        raise SecAggError(f"secure-aggregation message truncated ({len(data)} bytes).")
    kind = data[5]
    if kind not in _MESSAGES:
        raise SecAggError(f"unknown secure-aggregation message type {kind}.")
    return _MESSAGES[kind].from_bytes(data)


def _check_round(msg_round: int, round_id: int, what: str) -> None:
    if msg_round != round_id:
        raise SecAggError(f"{what} is for round {msg_round}, this aggregation is round {round_id}.")


# --------------------------------------------------------------------------- client


class SecAggClient:
    """One site's side of one aggregation round; call the four round methods in order, once each.

    Keys are fresh per instance, as the paper prescribes. ``enc_key`` /
    ``mask_key`` let a deployment reuse long-term keys instead; ``round_id``
    enters every key derivation, so masks still never repeat across rounds.
    """

    def __init__(
        self,
        site_id: int,
        round_id: int,
        *,
        enc_key: X25519PrivateKey | None = None,
        mask_key: X25519PrivateKey | None = None,
    ) -> None:
        self.site_id = _check_site_id(site_id)
        self.round_id = _check_round_id(round_id)
        self._enc_key = enc_key or X25519PrivateKey.generate()
        self._mask_key = mask_key or X25519PrivateKey.generate()
        self._phase = 0
        self._peers: dict[int, SiteKeys] = {}
        self._own_shares: tuple[int, int] = (0, 0)  # this site's share of its own (b_u, s_u^SK)
        self._received: dict[int, tuple[int, int]] = {}  # sender -> (share of b_sender, share of s_sender^SK)
        self._u2: frozenset[int] = frozenset()

    def _advance(self, expected: int, what: str) -> None:
        if self._phase != expected:
            raise SecAggError(
                f"site {self.site_id}: {what} called out of order (at step {self._phase}, expected {expected})."
            )
        self._phase += 1

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: publish the share-encryption and mask-agreement public keys."""
        self._advance(0, "advertise_keys")
        return AdvertiseKeys(
            self.round_id,
            SiteKeys(
                self.site_id,
                self._enc_key.public_key().public_bytes_raw(),
                self._mask_key.public_key().public_bytes_raw(),
            ),
        )

    def share_keys(self, broadcast: KeyBroadcast) -> ShareKeys:
        """Round 1: check the broadcast, draw b_u, and send every other site its encrypted shares of b_u and s_u^SK."""
        self._advance(1, "share_keys")
        _check_round(broadcast.round_id, self.round_id, "key broadcast")
        ids = [k.site_id for k in broadcast.sites]
        if len(set(ids)) != len(ids):
            raise SecAggError(f"site {self.site_id}: key broadcast lists a site id twice.")
        pubs = [k.enc_public for k in broadcast.sites] + [k.mask_public for k in broadcast.sites]
        if len(set(pubs)) != len(pubs):
            raise SecAggError(f"site {self.site_id}: key broadcast repeats a public key.")
        n, t = len(ids), broadcast.threshold
        if not 2 <= t <= n:
            raise SecAggError(f"site {self.site_id}: threshold {t} is out of range for {n} sites (need 2 <= t <= n).")
        self._peers = {k.site_id: k for k in broadcast.sites}
        own = self._peers.get(self.site_id)
        if (
            own is None
            or own.enc_public != self._enc_key.public_key().public_bytes_raw()
            or (own.mask_public != self._mask_key.public_key().public_bytes_raw())
        ):
            raise SecAggError(f"site {self.site_id}: key broadcast does not carry this site's own keys.")
        self._threshold, self._length, self._frac_bits = t, broadcast.vector_length, broadcast.frac_bits

        self._seed = secrets.token_bytes(_SECRET_BYTES)
        xs = [i + 1 for i in ids]
        b_shares = shamir_split(int.from_bytes(self._seed, "big"), t, xs)
        s_shares = shamir_split(int.from_bytes(self._mask_key.private_bytes_raw(), "big"), t, xs)
        self._own_shares = (b_shares[self.site_id + 1], s_shares[self.site_id + 1])
        out = []
        for v in ids:
            if v == self.site_id:
                continue
            plain = b_shares[v + 1].to_bytes(_SHARE_BYTES, "little") + s_shares[v + 1].to_bytes(_SHARE_BYTES, "little")
            key = self._share_key(v)
            nonce = secrets.token_bytes(_NONCE_BYTES)
            ct = AESGCM(key).encrypt(nonce, plain, _share_aad(self.round_id, self.site_id, v))
            out.append(EncryptedShare(self.site_id, v, nonce, ct))
        return ShareKeys(self.round_id, self.site_id, tuple(out))

    def _share_key(self, peer: int) -> bytes:
        shared = self._enc_key.exchange(X25519PublicKey.from_public_bytes(self._peers[peer].enc_public))
        return _hkdf(shared, b"share-enc", self.round_id, *_pair_ids(self.site_id, peer))

    def masked_input(self, delivery: ShareDelivery, update: np.ndarray) -> MaskedInput:
        """Round 2: decrypt the shares addressed here (U2 = their senders and us) and send y_u.

        ``update`` is the 1-D float update, already multiplied by its aggregation weight.
        """
        self._advance(2, "masked_input")
        _check_round(delivery.round_id, self.round_id, "share delivery")
        if delivery.recipient != self.site_id:
            raise SecAggError(f"site {self.site_id}: got the share delivery for site {delivery.recipient}.")
        for s in delivery.shares:
            if s.recipient != self.site_id:
                raise SecAggError(
                    f"site {self.site_id}: delivery holds a share from site {s.sender} addressed to site {s.recipient}."
                )
            if s.sender == self.site_id or s.sender not in self._peers:
                raise SecAggError(f"site {self.site_id}: delivery holds a share from unknown site {s.sender}.")
            if s.sender in self._received:
                raise SecAggError(f"site {self.site_id}: delivery holds two shares from site {s.sender}.")
            try:
                plain = AESGCM(self._share_key(s.sender)).decrypt(
                    s.nonce, s.ciphertext, _share_aad(self.round_id, s.sender, self.site_id)
                )
            except InvalidTag:
                raise SecAggError(
                    f"site {self.site_id}: the share from site {s.sender} failed AES-GCM authentication "
                    "(tampered with or corrupted in transit)."
                ) from None
            if len(plain) != 2 * _SHARE_BYTES:
                raise SecAggError(f"site {self.site_id}: the share from site {s.sender} has the wrong size.")
            self._received[s.sender] = (
                int.from_bytes(plain[:_SHARE_BYTES], "little"),
                int.from_bytes(plain[_SHARE_BYTES:], "little"),
            )
        self._u2 = frozenset(self._received) | {self.site_id}
        if len(self._u2) < self._threshold:
            raise SecAggError(
                f"site {self.site_id}: only {len(self._u2)} sites shared keys, "
                f"fewer than the threshold {self._threshold}."
            )

        x = np.asarray(update)
        if x.ndim != 1 or x.size != self._length:
            raise SecAggError(f"site {self.site_id}: update has shape {x.shape}, expected ({self._length},).")
        y = quantize(x, self._frac_bits, len(self._u2))
        _apply_prg(y, _hkdf(self._seed, b"self-mask", self.round_id, self.site_id))
        for v in sorted(self._u2 - {self.site_id}):
            key = _pair_mask_key(self._mask_key, self._peers[v].mask_public, self.round_id, self.site_id, v)
            _apply_prg(y, key, subtract=v < self.site_id)
        return MaskedInput(self.round_id, self.site_id, memoryview(y).cast("B"))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3: shares of b_v for survivors, of s_v^SK for dropped sites; refuses anything that could reveal both.

        Answered once only: a second request could ask for the other secret of a site.
        """
        if self._phase == 4:
            raise SecAggError(
                f"site {self.site_id}: refusing a second unmask request; answering twice could reveal both "
                "the self-mask seed and the mask key of one site."
            )
        self._advance(3, "unmask")
        _check_round(request.round_id, self.round_id, "unmask request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped
        if both:
            raise SecAggError(
                f"site {self.site_id}: refusing to unmask: sites {sorted(both)} are listed as both surviving and "
                "dropped, which would reveal both their self-mask seed and their mask key."
            )
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecAggError(f"site {self.site_id}: unmask request lists a site twice.")
        if self.site_id not in survivors:
            raise SecAggError(
                f"site {self.site_id}: refusing to unmask: the request lists this site, "
                "which sent its masked input, as not surviving."
            )
        if survivors | dropped != self._u2:
            raise SecAggError(
                f"site {self.site_id}: unmask request covers sites {sorted(survivors | dropped)}, "
                f"but the sites that shared keys are {sorted(self._u2)}."
            )
        if len(survivors) < self._threshold:
            raise SecAggError(
                f"site {self.site_id}: only {len(survivors)} survivors, fewer than the threshold {self._threshold}."
            )
        shares = dict(self._received)
        shares[self.site_id] = self._own_shares
        return UnmaskResponse(
            self.round_id,
            self.site_id,
            {v: shares[v][0] for v in sorted(survivors)},
            {v: shares[v][1] for v in sorted(dropped)},
        )


# --------------------------------------------------------------------------- server


class SecAggServer:
    """The aggregator: relays keys and shares, sums masked inputs, and unmasks the sum with the survivors' help.

    ``num_sites`` is the most sites that may join; ``threshold`` is t, the
    fewest sites that must remain at every step (2 <= t <= num_sites; the
    paper recommends t > num_sites / 2). It never sees an individual update.
    """

    def __init__(
        self, num_sites: int, threshold: int, vector_length: int, round_id: int, frac_bits: int = DEFAULT_FRAC_BITS
    ) -> None:
        if num_sites < 2:
            raise SecAggError(f"secure aggregation needs at least 2 sites, got {num_sites}.")
        if not 2 <= threshold <= num_sites:
            raise SecAggError(f"threshold {threshold} is out of range for {num_sites} sites (need 2 <= t <= n).")
        if vector_length < 1:
            raise SecAggError(f"vector length must be positive, got {vector_length}.")
        if not 0 <= frac_bits <= 52:
            raise SecAggError(f"frac_bits must be in [0, 52], got {frac_bits}.")
        self.num_sites, self.threshold, self.vector_length = num_sites, threshold, vector_length
        self.round_id, self.frac_bits = _check_round_id(round_id), frac_bits
        self._phase = 0
        self._keys: dict[int, SiteKeys] = {}  # U1
        self._share_msgs: dict[int, tuple[EncryptedShare, ...]] = {}  # U2
        self._sum: np.ndarray | None = None
        self._u3: set[int] = set()
        self._responses: dict[int, UnmaskResponse] = {}  # U4

    def _expect(self, phase: int, what: str) -> None:
        if self._phase != phase:
            raise SecAggError(f"server: {what} is not accepted now (step {self._phase}, needs step {phase}).")

    def _enough(self, n: int, what: str) -> None:
        if n < self.threshold:
            raise SecAggError(
                f"server: only {n} sites {what}, fewer than the threshold {self.threshold}; aborting the round."
            )

    # round 0
    def receive_keys(self, msg: AdvertiseKeys) -> None:
        """Round 0: record a site's public keys (U1)."""
        self._expect(0, "AdvertiseKeys")
        _check_round(msg.round_id, self.round_id, f"AdvertiseKeys from site {msg.site_id}")
        if msg.site_id in self._keys:
            raise SecAggError(f"server: duplicate site id {msg.site_id}: it advertised keys twice.")
        if len(self._keys) >= self.num_sites:
            raise SecAggError(f"server: site {msg.site_id} is one more than the {self.num_sites} expected sites.")
        _check_site_id(msg.site_id)
        if len(msg.keys.enc_public) != _KEY_BYTES or len(msg.keys.mask_public) != _KEY_BYTES:
            raise SecAggError(f"server: site {msg.site_id} sent malformed public keys.")
        self._keys[msg.site_id] = msg.keys

    def broadcast_keys(self) -> KeyBroadcast:
        """End round 0: everyone's keys plus threshold, vector length and frac_bits, for every site in U1."""
        self._expect(0, "broadcast_keys")
        self._enough(len(self._keys), "advertised keys")
        self._phase = 1
        return KeyBroadcast(
            self.round_id,
            self.threshold,
            self.vector_length,
            self.frac_bits,
            tuple(self._keys[i] for i in sorted(self._keys)),
        )

    # round 1
    def receive_shares(self, msg: ShareKeys) -> None:
        """Round 1: a site's encrypted shares, exactly one for every other site in U1 (U2)."""
        self._expect(1, "ShareKeys")
        _check_round(msg.round_id, self.round_id, f"ShareKeys from site {msg.site_id}")
        if msg.site_id not in self._keys:
            raise SecAggError(f"server: site {msg.site_id} sent shares but did not advertise keys.")
        if msg.site_id in self._share_msgs:
            raise SecAggError(f"server: site {msg.site_id} sent its shares twice.")
        recipients = sorted(s.recipient for s in msg.shares)
        if any(s.sender != msg.site_id for s in msg.shares) or recipients != sorted(set(self._keys) - {msg.site_id}):
            raise SecAggError(f"server: site {msg.site_id} did not send exactly one share to every other site.")
        self._share_msgs[msg.site_id] = msg.shares

    def deliver_shares(self) -> dict[int, ShareDelivery]:
        """End round 1: for each site in U2, the shares the other U2 sites addressed to it."""
        self._expect(1, "deliver_shares")
        self._enough(len(self._share_msgs), "shared keys")
        self._phase = 2
        inbox: dict[int, list[EncryptedShare]] = {v: [] for v in self._share_msgs}
        for shares in self._share_msgs.values():
            for s in shares:
                if s.recipient in inbox:
                    inbox[s.recipient].append(s)
        return {v: ShareDelivery(self.round_id, v, tuple(items)) for v, items in sorted(inbox.items())}

    # round 2
    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Round 2: add y_u to the running sum (U3); individual inputs are not kept."""
        self._expect(2, "MaskedInput")
        _check_round(msg.round_id, self.round_id, f"MaskedInput from site {msg.site_id}")
        if msg.site_id not in self._share_msgs:
            raise SecAggError(f"server: site {msg.site_id} sent a masked input but did not share keys.")
        if msg.site_id in self._u3:
            raise SecAggError(f"server: site {msg.site_id} sent its masked input twice.")
        y = msg.vector
        if y.size != self.vector_length:
            raise SecAggError(
                f"server: masked input from site {msg.site_id} has length {y.size}, expected {self.vector_length}."
            )
        if self._sum is None:
            self._sum = y.copy()
        else:
            np.add(self._sum, y, out=self._sum)
        self._u3.add(msg.site_id)

    def unmask_request(self) -> UnmaskRequest:
        """End round 2: tell the survivors (U3) who dropped after sharing keys (U2 minus U3)."""
        self._expect(2, "unmask_request")
        self._enough(len(self._u3), "sent masked inputs")
        self._phase = 3
        return UnmaskRequest(self.round_id, tuple(sorted(self._u3)), tuple(sorted(set(self._share_msgs) - self._u3)))

    # round 3
    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Round 3: a survivor's shares (U4); must be exactly b-shares for U3 and key shares for the dropped."""
        self._expect(3, "UnmaskResponse")
        _check_round(msg.round_id, self.round_id, f"UnmaskResponse from site {msg.site_id}")
        if msg.site_id not in self._u3:
            raise SecAggError(f"server: unmask response from site {msg.site_id}, which is not a survivor.")
        if msg.site_id in self._responses:
            raise SecAggError(f"server: site {msg.site_id} answered the unmask round twice.")
        dropped = set(self._share_msgs) - self._u3
        if set(msg.self_mask_shares) != self._u3 or set(msg.mask_key_shares) != dropped:
            raise SecAggError(f"server: unmask response from site {msg.site_id} does not match the request.")
        self._responses[msg.site_id] = msg

    def result(self) -> np.ndarray:
        """End round 3: reconstruct the secrets, remove every remaining mask, return the float64 sum over U3."""
        self._expect(3, "result")
        self._enough(len(self._responses), "answered the unmask round")
        self._phase = 4
        assert self._sum is not None
        total = self._sum
        self._sum = None
        t, rid = self.threshold, self.round_id
        for v in sorted(self._u3):
            b = shamir_reconstruct({u + 1: r.self_mask_shares[v] for u, r in self._responses.items()}, t)
            if b >> (8 * _SECRET_BYTES):
                raise SecAggError(f"server: the self-mask seed of site {v} did not reconstruct (inconsistent shares).")
            _apply_prg(total, _hkdf(b.to_bytes(_SECRET_BYTES, "big"), b"self-mask", rid, v), subtract=True)
        for d in sorted(set(self._share_msgs) - self._u3):
            s = shamir_reconstruct({u + 1: r.mask_key_shares[d] for u, r in self._responses.items()}, t)
            key = X25519PrivateKey.from_private_bytes(s.to_bytes(_SECRET_BYTES, "big")) if not s >> 256 else None
            if key is None or key.public_key().public_bytes_raw() != self._keys[d].mask_public:
                raise SecAggError(
                    f"server: the mask key of dropped site {d} did not reconstruct to its advertised public key."
                )
            for v in sorted(self._u3):
                # y_v carries +PRG(s_vd) if v < d, -PRG(s_vd) if v > d: undo it.
                _apply_prg(total, _pair_mask_key(key, self._keys[v].mask_public, rid, v, d), subtract=v < d)
        return dequantize(total, self.frac_bits)

    @property
    def survivors(self) -> tuple[int, ...]:
        """U3: the sites whose inputs are in the sum."""
        return tuple(sorted(self._u3))


# --------------------------------------------------------------------------- in-process driver


@dataclass
class SecureSumResult:
    """What :func:`secure_sum` returns: the sum, whose inputs it holds, and the wire bytes per site and round.

    ``sent[site][round]`` counts the serialised bytes the site sent to the
    server, ``received[site][round]`` those the server sent to it; rounds are
    :data:`ROUNDS`. Every site that took part has a row (zeros where it had
    already dropped).
    """

    total: np.ndarray
    survivors: tuple[int, ...]
    sent: dict[int, dict[str, int]] = field(default_factory=dict)
    received: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def bytes_up(self) -> int:
        """All bytes the sites sent to the server."""
        return sum(sum(row.values()) for row in self.sent.values())

    @property
    def bytes_down(self) -> int:
        """All bytes the server sent to the sites."""
        return sum(sum(row.values()) for row in self.received.values())

    def total_sent(self, site: int) -> int:
        return sum(self.sent.get(site, {}).values())

    def total_received(self, site: int) -> int:
        return sum(self.received.get(site, {}).values())


def secure_sum(
    updates: dict[int, np.ndarray],
    threshold: int,
    round_id: int,
    *,
    drop_after_advertise: Iterable[int] = (),
    drop_after_share: Iterable[int] = (),
    drop_after_mask: Iterable[int] = (),
    frac_bits: int = DEFAULT_FRAC_BITS,
) -> SecureSumResult:
    """Run the whole protocol in-process: the float64 sum of the updates of the sites that sent masked inputs.

    ``updates`` maps site id to its 1-D update (already weighted). Dropout is
    simulated: ``drop_after_advertise`` sites vanish before sharing keys,
    ``drop_after_share`` after sharing keys (their updates are left out of the
    sum), ``drop_after_mask`` after sending their masked input (their updates
    are in the sum; they just do not help unmask). Every message crosses a
    to_bytes/from_bytes boundary, so the byte counts in the result are what a
    transport carries (minus its own framing). Accuracy: each input is
    rounded to 2^-frac_bits, so ``total`` is within n_sites * 2^-frac_bits of
    the float sum. SecAggError for bad inputs or parameters and for too few
    sites left at any step.
    """
    if not updates:
        raise SecAggError("secure_sum needs at least one site's update.")
    ids = sorted(_check_site_id(i) for i in updates)
    if len(set(ids)) != len(ids):
        raise SecAggError("duplicate site ids in updates.")
    drops = [set(drop_after_advertise), set(drop_after_share), set(drop_after_mask)]
    unknown = set().union(*drops) - set(ids)
    if unknown:
        raise SecAggError(f"dropout lists name unknown sites {sorted(unknown)}.")
    first = np.asarray(updates[ids[0]])
    if first.ndim != 1:
        raise SecAggError(f"updates must be 1-D, site {ids[0]} has shape {first.shape}.")
    server = SecAggServer(len(ids), threshold, first.size, round_id, frac_bits)
    clients = {i: SecAggClient(i, round_id) for i in ids}
    sent = {i: dict.fromkeys(ROUNDS, 0) for i in ids}
    received = {i: dict.fromkeys(ROUNDS, 0) for i in ids}

    def wire(table: dict[int, dict[str, int]], site: int, round_name: str, msg):
        data = msg.to_bytes()
        table[site][round_name] += len(data)
        return type(msg).from_bytes(data)

    active = ids
    for i in active:
        server.receive_keys(wire(sent, i, "advertise_keys", clients[i].advertise_keys()))
    broadcast = server.broadcast_keys()
    active = [i for i in active if i not in drops[0]]
    for i in active:
        msg = clients[i].share_keys(wire(received, i, "advertise_keys", broadcast))
        server.receive_shares(wire(sent, i, "share_keys", msg))
    deliveries = server.deliver_shares()
    active = [i for i in active if i not in drops[1]]
    for i in active:
        msg = clients[i].masked_input(wire(received, i, "share_keys", deliveries[i]), updates[i])
        server.receive_masked_input(wire(sent, i, "masked_input", msg))
        del msg
    request = server.unmask_request()
    for i in active:
        if i not in drops[2]:
            msg = clients[i].unmask(wire(received, i, "unmask", request))
            server.receive_unmask(wire(sent, i, "unmask", msg))
    return SecureSumResult(server.result(), server.survivors, sent, received)
