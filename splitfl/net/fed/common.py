"""What both sides of the federation service share: the wire's constants, the run's identity, errors.

The server side (:mod:`~splitfl.net.fed.servicer`, :mod:`~splitfl.net.fed.server`) and the hospital
(:mod:`~splitfl.net.fed.hospital`) both import from here and never from each other, so what one side may
assume about the other is exactly what this module holds: the protocol's constants and payload limit, the
site names, the run id and configuration fingerprint a run is known by (:func:`run_fingerprint`,
:func:`default_run_id`), the fingerprint of the consortium's CKKS context, and the error detail carried in
the trailing metadata (raised as ``_Abort`` by the server, read back as :class:`RemoteError` by a site). The
wire's own names (the version, the Join nonce's size, :class:`RemoteError`) live in the torch-free
:mod:`~splitfl.net.fed.client` and are re-exported here.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import grpc

from splitfl.config import RunConfig
from splitfl.engine import resume_key
from splitfl.he.keys import context_fingerprint
from splitfl.net import ERROR_METADATA_KEY, ChunkError
from splitfl.net.fed.client import JOIN_NONCE_BYTES, SERVER_VERSION, RemoteError  # noqa: F401  (the wire's, re-exported)
from splitfl.net.proto import splitfl_pb2 as pb

DEFAULT_MAX_PAYLOAD = 4 << 30  # 4 GiB: ResNet-18 encrypted aggregates are ~180 MB


def site_name(index: int) -> str:
    return f"site-{index}"


def site_index(name: Optional[str]) -> Optional[int]:
    if not name or not name.startswith("site-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def run_fingerprint(cfg: RunConfig) -> bytes:
    """SHA-256 of the protocol-relevant configuration (all but display and hardware settings), same on every party."""

    d = resume_key(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("accelerator", "devices")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).digest()


def default_run_id(cfg: RunConfig) -> str:
    return f"{cfg.regime}-{run_fingerprint(cfg).hex()[:16]}"


def _context_fp(ctx: Any) -> bytes:
    """32 bytes naming a CKKS context's parameters and public key (the same for the secret and the public copy)."""

    return hashlib.sha256(context_fingerprint(ctx).encode()).digest()


# ============================================================================ errors


def error_detail(err: grpc.RpcError) -> Optional[pb.ErrorDetail]:
    """The ErrorDetail of a refused call (None if it carried none)."""
    return RemoteError.from_rpc(err).detail


class _Abort(Exception):
    """Inside a handler: end the call with this status and ErrorDetail."""

    def __init__(self, status: grpc.StatusCode, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.detail = status, pb.ErrorDetail(code=code, message=message, **extra)


def _abort(context: grpc.ServicerContext, exc: _Abort) -> None:
    context.set_trailing_metadata(((ERROR_METADATA_KEY, exc.detail.SerializeToString()),))
    context.abort(exc.status, exc.detail.message)


def _chunk_abort(e: ChunkError) -> _Abort:
    return _Abort(getattr(grpc.StatusCode, e.grpc_code), e.error_code, str(e), transfer_id=e.transfer_id, chunk_index=e.index)
