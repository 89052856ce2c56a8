"""Encrypted batches and their wire format, with every check a receiver needs.

An :class:`EncryptedBatch` is a list of SEAL-serialised CKKS ciphertexts plus
what they mean (kind, batch, width, slot layout). Ciphertexts travel in SEAL's
own serialisation: symmetric encryptions keep their PRNG seed, so a fresh
upload is half the size of an expanded ciphertext.

Wire format (little-endian)::

    magic "SFHE" | version u16 | kind u8 | 0 u8 | context fingerprint 32 B
    | batch u32 | dim u32 | layout: in_features, num_classes, batch_size, slots u32
    | value_bound f64 | n u32 | n x ciphertext length u32
    | CRC-32 of everything before it and of the body, 4 B | body

The declared lengths detect truncation and the CRC-32 corruption (any burst
of up to 32 flipped bits). Neither is a MAC, and no unkeyed digest could be:
whoever can change the bytes can recompute it, so the sender is authenticated
by the transport's TLS, and the fingerprint detects a wrong consortium key or
parameter set. A CRC costs a third of SHA-256 on the ~2 MB a split-he step
sends; encrypted FedAvg updates (:mod:`splitfl.he.aggregation`) keep SHA-256,
whose digest names an update so that a replay can be refused.
"""
from __future__ import annotations

import hashlib
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import tenseal as ts

from .keys import context_fingerprint, engine_for
from .packing import PackedLayout
from .params import HEError

__all__ = ["EncryptedBatch", "KINDS", "MAGIC", "FORMAT_VERSION"]

MAGIC = b"SFHE"
FORMAT_VERSION = 2  # 2: CRC-32 instead of SHA-256
KINDS: tuple[str, ...] = ("activations", "logits", "logit_grads", "activation_grads")
_KIND_CODE = {k: i + 1 for i, k in enumerate(KINDS)}
_HEAD = struct.Struct("<4sHBB32sII4IdI")  # up to and including n
_MAX_CIPHERTEXTS = 1 << 16
# SEAL serialisation header: magic 0xA15E, header size 16, version, compression, reserved, total size u64.
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E


# ----------------------------------------------------------------------------- frames
# Both encrypted payload formats (this module's batches, he.aggregation's updates) share one frame:
# a fixed header ending in the ciphertext count n, n u32 lengths, a checksum over header and body, the body.


class _Sha256:
    """SHA-256, 32 bytes: a digest that also names a payload (aggregation refuses a replayed update by it)."""

    size = 32

    @staticmethod
    def of(parts: Sequence[bytes | memoryview]) -> bytes:
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        return digest.digest()


class _Crc32:
    """CRC-32, 4 bytes: detects corruption at a third of SHA-256's cost (split-he batches)."""

    size = 4

    @staticmethod
    def of(parts: Sequence[bytes | memoryview]) -> bytes:
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        return struct.pack("<I", crc)


CHECKSUMS = {"sha256": _Sha256, "crc32": _Crc32}


def pack_frame(head: struct.Struct, fields: tuple, blobs: Sequence[bytes], checksum: str = "sha256") -> bytes:
    """``head`` packed from ``fields`` + (n,), the n blob lengths, the checksum, then the blobs."""
    header = head.pack(*fields, len(blobs)) + struct.pack(f"<{len(blobs)}I", *(len(b) for b in blobs))
    return b"".join([header, CHECKSUMS[checksum].of([header, *blobs]), *blobs])


@dataclass(frozen=True)
class Frame:
    """A frame whose structure and checksum were verified: header fields (n last) and blob views."""

    fields: tuple
    blobs: list[memoryview]
    digest: str  # hex checksum the frame carries (SHA-256 where it names the payload)
    nbytes: int


def read_frame(data: object, head: struct.Struct, magic: bytes, version: int, max_blobs: int, what: str,
               noun: str, checksum: str = "sha256") -> Frame:
    """Check size, magic, version, declared lengths (truncation, trailing bytes) and SHA-256; HEError naming ``what``.

    ``noun`` says what the magic announces (for the error text). The first two header fields must be the magic and
    the format version and the last the blob count. Nothing in the blobs is interpreted here.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HEError(f"{what}: expected bytes, got {type(data).__name__}.")
    data = bytes(data)
    algo = CHECKSUMS[checksum]
    if len(data) < head.size + algo.size:
        raise HEError(f"{what} truncated: {len(data)} bytes, the header alone needs {head.size + algo.size}.")
    fields = head.unpack_from(data, 0)
    if fields[0] != magic:
        raise HEError(f"{what} is not {noun}: magic {fields[0]!r}, expected {magic!r}.")
    if fields[1] != version:
        raise HEError(
            f"{what} has format version {fields[1]}; this splitfl reads version {version}. "
            "Update the senders and the receiver to the same splitfl release."
        )
    n = fields[-1]
    if n > max_blobs:
        raise HEError(f"{what} declares {n} ciphertexts (more than {max_blobs}); refusing.")
    lengths_end = head.size + 4 * n
    if len(data) < lengths_end + algo.size:
        raise HEError(f"{what} truncated inside its header ({len(data)} bytes, {n} ciphertexts declared).")
    sizes = struct.unpack_from(f"<{n}I", data, head.size)
    body_start = lengths_end + algo.size
    if len(data) - body_start != sum(sizes):
        state = "truncated" if len(data) - body_start < sum(sizes) else "has trailing bytes"
        raise HEError(f"{what} {state}: its header declares {sum(sizes)} ciphertext bytes, {len(data) - body_start} arrived.")
    view = memoryview(data)
    digest = algo.of([view[:lengths_end], view[body_start:]])
    if digest != data[lengths_end:body_start]:
        raise HEError(f"{what}: checksum mismatch, the bytes were corrupted or tampered with in transit.")
    blobs, offset = [], body_start
    for size in sizes:
        blobs.append(view[offset : offset + size])
        offset += size
    return Frame(fields, blobs, digest.hex(), len(data))


@dataclass
class EncryptedBatch:
    """Ciphertexts of one batch message: kind, true batch size, width, layout, SEAL payloads.

    ``value_bound`` is the bound on |values| the sender guarantees, a
    constant of the configuration (the hospital's input bound, or
    ``max_abs_value`` for the server's replies), never derived from data or
    weights; ``context`` is the local context the payloads belong to (not
    serialised).
    """

    kind: str
    batch: int
    dim: int
    layout: PackedLayout
    payloads: list[bytes]
    value_bound: float
    fingerprint: str
    context: Optional[ts.Context] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HEError(f"EncryptedBatch kind {self.kind!r} is not one of {list(KINDS)}.")

    @property
    def nbytes(self) -> int:
        """Ciphertext bytes (what the wire carries besides a ~100-byte header)."""
        return sum(len(p) for p in self.payloads)

    def to_bytes(self) -> bytes:
        fp = bytes.fromhex(self.fingerprint.split(":", 1)[-1])
        lay = self.layout
        fields = (MAGIC, FORMAT_VERSION, _KIND_CODE[self.kind], 0, fp, self.batch, self.dim,
                  lay.in_features, lay.num_classes, lay.batch_size, lay.slots, float(self.value_bound))
        return pack_frame(_HEAD, fields, self.payloads, checksum="crc32")

    @classmethod
    def from_bytes(
        cls,
        ctx: ts.Context,
        data: bytes,
        expect_kind: Optional[str] = None,
        expect_batch: Optional[int] = None,
        expect_dim: Optional[int] = None,
    ) -> "EncryptedBatch":
        """Parse and check a message; HEError for anything malformed, foreign or unexpected.

        Checks, in order: size and magic, format version, declared lengths vs
        the bytes received (truncation), CRC-32 (corruption),
        context fingerprint (other key or parameters), kind, batch and width
        against ``expect_*``, the declared value bound, layout vs the
        context's slots, ciphertext count vs the layout, and each
        ciphertext's SEAL header (SEAL itself validates the rest when the
        head loads them). Pure: nothing is
        computed or cached, so a rejected message leaves no trace.
        """
        frame = read_frame(data, _HEAD, MAGIC, FORMAT_VERSION, _MAX_CIPHERTEXTS, "Encrypted batch",
                           "a splitfl encrypted batch", checksum="crc32")
        (_, _, kind_code, _, fp, batch, dim, d, k, bs, slots, bound, n) = frame.fields
        mine = context_fingerprint(ctx)
        theirs = "sha256:" + fp.hex()
        if theirs != mine:
            raise HEError(
                f"Encrypted batch was made under context {theirs[:19]}..., this context is {mine[:19]}...: another "
                "consortium key or parameter set. Use the public context of the hospitals' current key."
            )
        if not 1 <= kind_code <= len(KINDS):
            raise HEError(f"Unknown encrypted batch kind code {kind_code}.")
        kind = KINDS[kind_code - 1]
        if expect_kind is not None and kind != expect_kind:
            raise HEError(f"Expected an encrypted {expect_kind!r} batch, got {kind!r}.")
        if expect_batch is not None and batch != expect_batch:
            raise HEError(f"Encrypted {kind} batch has {batch} samples, expected {expect_batch}.")
        if expect_dim is not None and dim != expect_dim:
            raise HEError(f"Encrypted {kind} batch has width {dim}, expected {expect_dim} (the head's shape).")
        if not (math.isfinite(bound) and bound >= 0):
            raise HEError(f"Encrypted {kind} batch declares an invalid value bound {bound!r}.")
        layout = PackedLayout(d, k, bs, slots)
        check_message_shape(layout, kind, batch, dim, n, ctx)

        payloads = []
        for i, blob in enumerate(frame.blobs):
            payload = bytes(blob)
            _check_seal_header(payload, f"ciphertext #{i} of the {kind} batch")
            payloads.append(payload)
        return cls(kind, batch, dim, layout, payloads, bound, mine, ctx)


def check_message_shape(layout: PackedLayout, kind: str, batch: int, dim: int, n: int, ctx: ts.Context) -> None:
    """Batch, width and ciphertext count must agree with the layout, and the layout with the context."""
    slots = engine_for(ctx).slots
    if layout.slots != slots:
        raise HEError(f"Encrypted batch layout uses {layout.slots} slots but the context has {slots}.")
    if not 1 <= batch <= layout.batch_size:
        raise HEError(f"Encrypted {kind} batch declares {batch} samples; the layout holds 1..{layout.batch_size}.")
    if dim != layout.dim(kind):
        raise HEError(f"Encrypted {kind} batch has width {dim} but its layout implies {layout.dim(kind)}.")
    expected = layout.n_ciphertexts(kind)
    if n != expected:
        raise HEError(f"Encrypted {kind} batch carries {n} ciphertexts; its layout needs exactly {expected}.")


def _check_seal_header(payload: bytes, what: str) -> None:
    if len(payload) < _SEAL_HEADER.size:
        raise HEError(f"{what} is {len(payload)} bytes, shorter than a SEAL header.")
    magic, header_size, _, _, _, _, size = _SEAL_HEADER.unpack_from(payload, 0)
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or size != len(payload):
        raise HEError(f"{what} is not a SEAL-serialised object (bad header or size).")
