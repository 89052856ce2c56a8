"""Secure-aggregation wire format: the seven protocol messages and their byte encoding.

Each message is a frozen dataclass of ints and bytes with ``to_bytes`` /
``from_bytes`` (little-endian, header magic ``SFSA``, format version,
message type, round id); :func:`decode_message` parses any of them by its
type byte, which is what a transport receiving bytes calls. Parsing is
bounds-checked, so truncated, padded or oversized input is a SecAggError
rather than a crash or a large allocation. :class:`SiteKeys` (a site's two
public keys) lives here because it is serialised inside AdvertiseKeys and
KeyBroadcast and held by the server as well as the sites. The format sits
between the primitives and the two protocol roles so that the client and
the server share one definition of every byte and neither imports the other.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from splitfl.fed.secagg.primitives import (
    _KEY_BYTES,
    _NONCE_BYTES,
    _SHARE_BYTES,
    SecAggError,
)

__all__ = [
    "AdvertiseKeys",
    "EncryptedShare",
    "KeyBroadcast",
    "MaskedInput",
    "ShareDelivery",
    "ShareKeys",
    "SiteKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
]

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

