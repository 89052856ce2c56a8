"""Large payloads as streams of ``Chunk`` messages, and their checked, bounded-memory reassembly.

gRPC refuses messages over 4 MiB by default; models (~45 MB), encrypted
aggregates (~180 MB) and public CKKS contexts (up to hundreds of MB) are far
larger. Every payload therefore travels as chunks ``0 .. total_chunks - 1`` of
one transfer (``protos/splitfl.proto``, message ``Chunk``), each with at most
``chunk_size`` bytes of data (1 MiB by default).

The rules the receiver enforces (each violation is a :class:`ChunkError`
naming the transfer and the chunk):

* ``transfer_id`` (1..64 bytes), ``total_chunks`` and ``total_size`` are the
  same in every chunk of a transfer;
* ``total_size`` is checked against the receiver's ``max_bytes`` at the
  *first* chunk, before anything is buffered, and the data may never run past
  it, so memory stays bounded by ``max_bytes`` whatever the sender declares;
* ``total_chunks`` is 1 for an empty payload and at most ``total_size``
  otherwise (every chunk carries at least one byte): a sender cannot make the
  receiver loop over billions of empty chunks;
* indices run 0, 1, 2, ... without gap, duplicate or reordering;
* the data adds up to exactly ``total_size`` in exactly ``total_chunks``
  chunks, and the stream of a single transfer ends after the last one;
* the last chunk, and only it, carries the SHA-256 of the whole payload,
  which must match.

The SHA-256 detects corruption and truncation; it is not a MAC (sender
authentication is the transport's job: TLS).
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from splitfl.net.proto.splitfl_pb2 import (
    ERROR_CODE_BAD_CHUNKS,
    ERROR_CODE_TOO_LARGE,
    Chunk,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_TRANSFER_ID_BYTES",
    "ChecksumMismatch",
    "Chunk",
    "ChunkError",
    "PayloadTooLarge",
    "Reassembler",
    "TransferInfo",
    "assemble",
    "assemble_into",
    "new_transfer_id",
    "open_stream",
    "read_transfer",
    "split_payload",
]

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB of data per message: far under gRPC's 4 MiB default
MAX_TRANSFER_ID_BYTES = 64
TRANSFER_ID_BYTES = 16
_DIGEST_BYTES = 32

M = TypeVar("M")


class ChunkError(ValueError):
    """A chunk stream broke the chunking rules; ``index`` is the offending chunk (-1: the stream as a whole).

    ``grpc_code`` (a ``grpc.StatusCode`` name) and ``error_code`` (a
    ``splitfl.v1.ErrorCode``) are what a server answers with:
    ``context.abort(getattr(grpc.StatusCode, e.grpc_code), str(e))``.
    """

    grpc_code = "INVALID_ARGUMENT"
    error_code = ERROR_CODE_BAD_CHUNKS

    def __init__(self, message: str, transfer_id: bytes = b"", index: int = -1) -> None:
        super().__init__(message)
        self.transfer_id = transfer_id
        self.index = index


class PayloadTooLarge(ChunkError):
    """The declared or actual size is over the receiver's limit (gRPC RESOURCE_EXHAUSTED, ERROR_CODE_TOO_LARGE)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    error_code = ERROR_CODE_TOO_LARGE


class ChecksumMismatch(ChunkError):
    """The payload does not hash to the SHA-256 its last chunk declares (gRPC DATA_LOSS)."""

    grpc_code = "DATA_LOSS"


@dataclass(frozen=True)
class TransferInfo:
    """A completed, verified transfer: its id, size in bytes, number of chunks and SHA-256."""

    transfer_id: bytes
    size: int
    chunks: int
    sha256: bytes


def new_transfer_id() -> bytes:
    """16 random bytes."""
    return os.urandom(TRANSFER_ID_BYTES)


def _check_transfer_id(transfer_id: bytes) -> bytes:
    if not isinstance(transfer_id, (bytes, bytearray)) or not 1 <= len(transfer_id) <= MAX_TRANSFER_ID_BYTES:
        raise ValueError(f"transfer id must be 1..{MAX_TRANSFER_ID_BYTES} bytes, got {transfer_id!r}")
    return bytes(transfer_id)


def split_payload(
    data: bytes | bytearray | memoryview,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transfer_id: bytes | None = None,
) -> Iterator[Chunk]:
    """The chunks of ``data``: ``ceil(len / chunk_size)`` of them (one, empty, for empty data).

    Every chunk carries the transfer id, its index, the total count and size;
    the last one carries the SHA-256 of ``data``. The digest is computed before
    the first chunk is yielded, so ``data`` must not change while this runs.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    tid = new_transfer_id() if transfer_id is None else _check_transfer_id(transfer_id)
    view = memoryview(data).cast("B")
    size = view.nbytes
    total = max(1, -(-size // chunk_size))
    digest = hashlib.sha256(view).digest()
    for i in range(total):
        piece = view[i * chunk_size:(i + 1) * chunk_size]
        yield Chunk(
            transfer_id=tid,
            index=i,
            total_chunks=total,
            total_size=size,
            data=piece.tobytes(),
            sha256=digest if i == total - 1 else b"",
        )


class Reassembler:
    """Checks one transfer chunk by chunk and hands each chunk's data to ``sink`` in order.

    ``feed`` returns True once the last chunk has arrived and the digest
    matched; after that the transfer is complete (``info``). Data reaches the
    sink before the digest is checked (it comes with the last chunk): a sink
    that writes somewhere lasting must discard what it wrote if a
    :class:`ChunkError` is raised (e.g. write a temporary file, rename it on
    success).
    """

    def __init__(
        self,
        max_bytes: int,
        sink: Callable[[bytes], Any],
        *,
        max_chunk_bytes: int | None = None,
        transfer_id: bytes | None = None,
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        if max_chunk_bytes is not None and max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes!r}")
        self.max_bytes, self.max_chunk_bytes = max_bytes, max_chunk_bytes
        self.sink = sink
        self.expected_id = None if transfer_id is None else _check_transfer_id(transfer_id)
        self.transfer_id: bytes | None = None
        self.total_chunks = self.total_size = 0
        self.received = 0  # bytes
        self.next_index = 0
        self._hash = hashlib.sha256()
        self.info: TransferInfo | None = None

    @property
    def done(self) -> bool:
        return self.info is not None

    def _fail(self, what: str, index: int, cls: type[ChunkError] = ChunkError) -> ChunkError:
        tid = self.transfer_id or b""
        name = f"transfer {tid.hex()[:16]}" if tid else "transfer"
        where = f"chunk {index}" if index >= 0 else "stream"
        return cls(f"{name}: {where}: {what}", tid, index)

    def _first(self, chunk: Chunk) -> None:
        tid = bytes(chunk.transfer_id)
        if not 1 <= len(tid) <= MAX_TRANSFER_ID_BYTES:
            raise self._fail(f"transfer id of {len(tid)} bytes (must be 1..{MAX_TRANSFER_ID_BYTES})", chunk.index)
        self.transfer_id = tid
        if self.expected_id is not None and tid != self.expected_id:
            raise self._fail(f"transfer id {tid.hex()} is not the announced {self.expected_id.hex()}", chunk.index)
        size, total = chunk.total_size, chunk.total_chunks
        if size > self.max_bytes:  # before anything is buffered
            raise self._fail(f"declared size {size} bytes is over the limit of {self.max_bytes}", chunk.index, PayloadTooLarge)
        if total < 1 or total > max(1, size):
            raise self._fail(
                f"declares {total} chunks for {size} bytes (must be 1 for an empty payload, else 1..{size})", chunk.index
            )
        self.total_size, self.total_chunks = size, total

    def feed(self, chunk: Chunk) -> bool:
        """Check ``chunk`` and pass its data on; True when the transfer is complete and verified."""
        index = chunk.index
        if self.info is not None:
            raise self._fail(f"arrived after the last chunk ({self.total_chunks - 1})", index)
        if self.transfer_id is None:
            self._first(chunk)
        elif chunk.transfer_id != self.transfer_id:
            raise self._fail(f"belongs to another transfer ({bytes(chunk.transfer_id).hex()[:16]})", index)
        elif chunk.total_chunks != self.total_chunks or chunk.total_size != self.total_size:
            raise self._fail(
                f"declares {chunk.total_chunks} chunks / {chunk.total_size} bytes, earlier chunks "
                f"{self.total_chunks} / {self.total_size}",
                index,
            )
        if index != self.next_index:
            if index < self.next_index:
                raise self._fail(f"duplicate or out of order (expected chunk {self.next_index})", index)
            raise self._fail(f"missing chunk(s) {self.next_index}..{index - 1} (expected chunk {self.next_index})", index)
        data = chunk.data
        n = len(data)
        last = index == self.total_chunks - 1
        if self.max_chunk_bytes is not None and n > self.max_chunk_bytes:
            raise self._fail(f"{n} bytes of data, over the chunk limit of {self.max_chunk_bytes}", index)
        if self.received + n > self.total_size:
            raise self._fail(
                f"data runs past the declared size ({self.received + n} > {self.total_size} bytes)",
                index,
                PayloadTooLarge if self.received + n > self.max_bytes else ChunkError,
            )
        if n == 0 and self.total_size > 0:
            raise self._fail("empty chunk in a non-empty payload", index)
        if chunk.sha256 and not last:
            raise self._fail("carries a SHA-256 but is not the last chunk", index)
        self._hash.update(data)
        self.received += n
        self.next_index += 1
        self.sink(data)
        if not last:
            return False
        if self.received != self.total_size:
            raise self._fail(f"last chunk, but {self.received} of {self.total_size} bytes arrived", index)
        if len(chunk.sha256) != _DIGEST_BYTES:
            raise self._fail(f"the last chunk must carry a {_DIGEST_BYTES}-byte SHA-256, got {len(chunk.sha256)} bytes", index)
        digest = self._hash.digest()
        if digest != chunk.sha256:
            raise self._fail(
                f"SHA-256 mismatch: payload hashes to {digest.hex()[:16]}.., the sender declared {chunk.sha256.hex()[:16]}..",
                index,
                ChecksumMismatch,
            )
        self.info = TransferInfo(self.transfer_id, self.received, self.total_chunks, digest)
        return True

    def ended(self) -> TransferInfo:
        """Call when the stream ends: the transfer's info, or ChunkError if it is incomplete."""
        if self.info is not None:
            return self.info
        if self.transfer_id is None:
            raise self._fail("no chunks (an empty payload is one chunk with empty data)", -1)
        raise self._fail(
            f"ended after {self.next_index} of {self.total_chunks} chunks ({self.received} of {self.total_size} bytes)", -1
        )


def read_transfer(
    chunks: Iterator[Chunk],
    max_bytes: int,
    sink: Callable[[bytes], Any],
    *,
    max_chunk_bytes: int | None = None,
    transfer_id: bytes | None = None,
) -> TransferInfo:
    """Consume exactly one transfer from ``chunks`` (an iterator shared with later transfers) into ``sink``.

    Stops right after the transfer's last chunk, so several transfers can
    follow each other in one stream (SubmitUpdate's parts).
    """
    r = Reassembler(max_bytes, sink, max_chunk_bytes=max_chunk_bytes, transfer_id=transfer_id)
    for chunk in chunks:
        if r.feed(chunk):
            break
    return r.ended()


def assemble_into(
    chunks: Iterable[Chunk],
    sink: Callable[[bytes], Any],
    max_bytes: int,
    *,
    max_chunk_bytes: int | None = None,
    transfer_id: bytes | None = None,
) -> TransferInfo:
    """Stream one whole transfer into ``sink`` (e.g. a file's ``write``); refuses chunks after the last.

    Memory: one chunk at a time. See :class:`Reassembler` on discarding the
    sink's output when a ChunkError is raised.
    """
    it = iter(chunks)
    info = read_transfer(it, max_bytes, sink, max_chunk_bytes=max_chunk_bytes, transfer_id=transfer_id)
    extra = next(it, None)
    if extra is not None:
        raise ChunkError(
            f"transfer {info.transfer_id.hex()[:16]}: chunk {extra.index}: arrived after the last chunk "
            f"({info.chunks - 1})",
            info.transfer_id,
            extra.index,
        )
    return info


def assemble(
    chunks: Iterable[Chunk],
    max_bytes: int,
    *,
    max_chunk_bytes: int | None = None,
    transfer_id: bytes | None = None,
) -> bytes:
    """The payload of one whole transfer, checked (see the module docstring); ChunkError otherwise.

    Memory stays bounded by ``max_bytes`` (plus one chunk and the buffer's
    growth margin): an oversize declaration is refused at the first chunk,
    and data beyond the declared size at the chunk that brings it.
    """
    buf = io.BytesIO()
    assemble_into(chunks, buf.write, max_bytes, max_chunk_bytes=max_chunk_bytes, transfer_id=transfer_id)
    return buf.getvalue()


def open_stream(messages: Iterable[M], first_only: tuple[str, ...] = ("header",)) -> tuple[M, Iterator[Chunk]]:
    """Split a request/response stream into its first message and the chunks of all messages.

    The first message carries the header and the call's parameters (the
    fields in ``first_only``) and may carry chunk 0; every later message must
    carry a chunk and none of ``first_only``. Returns the first message and
    an iterator over the chunks (of the first message, if set, then of the
    rest), which checks the later messages lazily as it goes.
    """
    it = iter(messages)
    first = next(it, None)
    if first is None:
        raise ChunkError("empty stream: the first message must carry the header")

    def chunks() -> Iterator[Chunk]:
        if first.HasField("chunk"):
            yield first.chunk
        for n, msg in enumerate(it, start=1):
            stray = [f for f in first_only if msg.HasField(f)]
            if stray:
                raise ChunkError(f"stream message {n} sets {', '.join(stray)}, allowed in the first message only")
            if not msg.HasField("chunk"):
                raise ChunkError(f"stream message {n} carries no chunk")
            yield msg.chunk

    return first, chunks()

