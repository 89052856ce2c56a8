"""A site's side of ``splitfl.v1.FederationService`` on the wire, without torch: :class:`FedClient`.

The calls a site makes in a round (``Join``, ``GetRound``, ``DownloadModel``, ``SubmitUpdate``) with their
header, session and sequence numbers, on payloads as bytes. The real hospital
(:class:`~splitfl.net.fed.hospital.FedSiteClient`) is this class plus local training, packaging and retries;
the clinic load benchmark (:mod:`splitfl.bench.clinic_clients`) runs a hundred of these with replayed
encrypted updates. It imports neither torch nor TenSEAL, and it holds the wire's constants and
:class:`RemoteError`, which :mod:`~splitfl.net.fed.common` re-exports to both sides.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator, Optional

import grpc

from splitfl.net import (
    DEFAULT_CHUNK_SIZE,
    ERROR_METADATA_KEY,
    PROTOCOL_VERSION,
    assemble,
    new_transfer_id,
    split_payload,
)
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pb_grpc

SERVER_VERSION = "splitfl-fed/1"
JOIN_NONCE_BYTES = 16


class RemoteError(RuntimeError):
    """A call was refused; ``code`` is the gRPC status, ``detail`` the server's ErrorDetail (or None)."""

    def __init__(self, code: grpc.StatusCode, message: str, detail: Optional[pb.ErrorDetail] = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.detail = code, message, detail

    @property
    def error_code(self) -> int:
        return self.detail.code if self.detail is not None else pb.ERROR_CODE_UNSPECIFIED

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> "RemoteError":
        detail = None
        for item in err.trailing_metadata() or ():
            k, v = (item.key, item.value) if hasattr(item, "key") else item
            if k == ERROR_METADATA_KEY:
                detail = pb.ErrorDetail.FromString(v)
        return cls(err.code(), err.details() or "", detail)


class FedClient:
    """One site's session with the federation server: the round's RPCs (raising grpc.RpcError, as sent)."""

    def __init__(self, channel: grpc.Channel, site: int, run_id: str, fingerprint: bytes) -> None:
        self.stub = pb_grpc.FederationServiceStub(channel)
        self.site, self.run_id, self.fingerprint = site, run_id, fingerprint
        self.session = b""
        self.seq = 0
        self.info: Any = None

    def header(self, *, opening: bool = False) -> pb.RequestHeader:
        if opening:
            return pb.RequestHeader(protocol_version=PROTOCOL_VERSION, run_id=self.run_id, config_fingerprint=self.fingerprint, site_id=self.site)
        self.seq += 1
        return pb.RequestHeader(
            protocol_version=PROTOCOL_VERSION, run_id=self.run_id, config_fingerprint=self.fingerprint,
            site_id=self.site, session_id=self.session, sequence=self.seq,
        )

    def open_session(self, sample_count: int, context_fp: bytes = b"") -> pb.FedRunInfo:
        """Join: a new session (sequence numbers restart) announcing the site's sample count; the run's info."""
        req = pb.JoinRequest(
            header=self.header(opening=True), client_nonce=os.urandom(JOIN_NONCE_BYTES),
            sample_count=sample_count, context_fingerprint=context_fp, client_version=SERVER_VERSION,
        )
        responses = iter(self.stub.Join(req, timeout=30))
        first = next(responses)
        for _ in responses:
            pass
        self.session, self.seq = first.run.session.session_id, 0
        self.info = first.run
        return first.run

    def get_round(self, min_round: int, poll_ms: int) -> pb.RoundInfo:
        """Long-poll the round state until round ``min_round`` opens (or this site must decrypt, or ``poll_ms`` passes)."""
        req = pb.GetRoundRequest(header=self.header(), min_round=min_round, max_wait_ms=poll_ms)
        return self.stub.GetRound(req, timeout=poll_ms / 1000 + 30)

    def download(self, round_index: int, part: int) -> bytes:
        responses = iter(self.stub.DownloadModel(pb.DownloadModelRequest(header=self.header(), round=round_index, part=part), timeout=600))
        first = next(responses)
        if not first.HasField("descriptor"):
            raise RemoteError(grpc.StatusCode.INTERNAL, "download without a descriptor")

        def chunks() -> Iterator[pb.Chunk]:
            if first.HasField("chunk"):
                yield first.chunk
            for msg in responses:
                yield msg.chunk

        data = assemble(chunks(), int(first.descriptor.size))
        if hashlib.sha256(data).digest() != first.descriptor.sha256:
            raise RemoteError(grpc.StatusCode.DATA_LOSS, "downloaded payload does not match its descriptor")
        return data

    def submit(self, meta: pb.UpdateMeta, parts: list[tuple[int, bytes]]) -> pb.SubmitUpdateResponse:
        ids = [new_transfer_id() for _ in parts]
        for (enc, data), tid in zip(parts, ids):
            meta.parts.append(pb.UpdatePart(encoding=enc, transfer_id=tid, size=len(data)))

        def messages() -> Iterator[pb.SubmitUpdateRequest]:
            yield pb.SubmitUpdateRequest(header=self.header(), meta=meta)
            for (_, data), tid in zip(parts, ids):
                for chunk in split_payload(data, DEFAULT_CHUNK_SIZE, tid):
                    yield pb.SubmitUpdateRequest(chunk=chunk)

        return self.stub.SubmitUpdate(messages(), timeout=600)
