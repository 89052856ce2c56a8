"""The network layer: gRPC services of ``protos/splitfl.proto``, chunked payloads, TLS and site tokens.

* ``splitfl.net.proto``: the generated code (regenerate with
  ``python -m splitfl.net.codegen``; :mod:`splitfl.net.codegen`);
* :mod:`splitfl.net.chunks`: payloads as ``Chunk`` streams and their checked,
  bounded-memory reassembly;
* :mod:`splitfl.net.certs` and :mod:`splitfl.net.tls`: development PKI, (mutual)
  TLS channels and the per-site token metadata (``x-splitfl-site``,
  ``x-splitfl-token``) checked by ``SiteAuthInterceptor``.

The constants below are the protocol's fixed names, shared by clients and servers.
"""
from __future__ import annotations

from splitfl.net.chunks import (
    DEFAULT_CHUNK_SIZE,
    ChecksumMismatch,
    ChunkError,
    PayloadTooLarge,
    Reassembler,
    TransferInfo,
    assemble,
    assemble_into,
    new_transfer_id,
    open_stream,
    read_transfer,
    split_payload,
)

# The protocol version this code speaks (RequestHeader.protocol_version; splitfl.v1.PROTOCOL_VERSION_1).
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (PROTOCOL_VERSION,)
# Full names of the two Status methods: exempt from the token check (SiteAuthInterceptor(exempt=...)).
STATUS_METHODS: tuple[str, ...] = ("/splitfl.v1.SplitService/Status", "/splitfl.v1.FederationService/Status")
# Binary trailing-metadata key of a refused call's serialized splitfl.v1.ErrorDetail.
ERROR_METADATA_KEY = "splitfl-error-bin"
# Sequence numbers accepted out of order within this distance of the highest one (SessionInfo.replay_window).
DEFAULT_REPLAY_WINDOW = 64
# How far ahead of a session's highest accepted sequence number a request may jump, in replay windows. A
# client numbers its requests 1, 2, 3, ..., so a genuine jump is only its calls still in flight or lost on
# the way (a few); a far jump (a bug, or a forged header) would move the window and make every later genuine
# request look replayed. Refused like a replay (ERROR_CODE_REPLAYED), before any state changes.
MAX_SEQUENCE_JUMP_WINDOWS = 16


def max_sequence_jump(replay_window: int) -> int:
    """The largest accepted ``sequence - highest`` for a session with this replay window."""
    return MAX_SEQUENCE_JUMP_WINDOWS * replay_window

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_REPLAY_WINDOW",
    "ERROR_METADATA_KEY",
    "MAX_SEQUENCE_JUMP_WINDOWS",
    "PROTOCOL_VERSION",
    "STATUS_METHODS",
    "SUPPORTED_VERSIONS",
    "ChecksumMismatch",
    "ChunkError",
    "PayloadTooLarge",
    "Reassembler",
    "TransferInfo",
    "assemble",
    "assemble_into",
    "max_sequence_jump",
    "new_transfer_id",
    "open_stream",
    "read_transfer",
    "split_payload",
]
