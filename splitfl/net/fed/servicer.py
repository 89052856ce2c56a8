"""The server's gRPC face: :class:`FederationServer` (``splitfl.v1.FederationService``) and :func:`make_server`.

:class:`FederationServer` wraps a :class:`~splitfl.fed.server.FedServerCore` (the validation, aggregation and
books of the in-process :class:`~splitfl.fed.runner.FedRunner`) in a round state machine guarded by one
condition variable. Every call is checked in the protocol's order (token + client certificate by
:class:`~splitfl.net.tls.SiteAuthInterceptor`, then version, run id + config fingerprint, site, session,
sequence) before any payload is read; payloads are chunk streams (:mod:`splitfl.net.chunks`). Its coordinator's
side (:meth:`~FederationServer.wait_for_sites`, :meth:`~FederationServer.run_round`, under ``fed.secure:
masks`` the secure-aggregation phases, under ``fed.secure: he`` the remote decryption, and
:meth:`~FederationServer.finish`) is driven by the server's round loop (:mod:`~splitfl.net.fed.server`).
:func:`make_server` serves it with mutual TLS and site tokens.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import grpc
import numpy as np

from splitfl.config import RunConfig
from splitfl.engine import RunError
from splitfl.fed import secagg as sa
from splitfl.fed.server import FedServerCore, RoundAcc, vector_bytes, vector_from_bytes
from splitfl.net import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_REPLAY_WINDOW,
    PROTOCOL_VERSION,
    STATUS_METHODS,
    SUPPORTED_VERSIONS,
    ChunkError,
    max_sequence_jump,
    open_stream,
    read_transfer,
    split_payload,
)
from splitfl.net.certs import PkiError, load_server_folder
from splitfl.net.fed.common import (
    DEFAULT_MAX_PAYLOAD,
    JOIN_NONCE_BYTES,
    SERVER_VERSION,
    _Abort,
    _abort,
    _chunk_abort,
    _context_fp,
    default_run_id,
    run_fingerprint,
    site_index,
    site_name,
)
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pb_grpc
from splitfl.net.tls import SiteAuthInterceptor, add_server_port, authenticated_site, server_credentials


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Session:
    session_id: bytes
    highest: int = 0
    seen: set[int] = field(default_factory=set)


class FederationServer(pb_grpc.FederationServiceServicer):
    """The FederationService: round state machine around a :class:`FedServerCore`."""

    def __init__(
        self,
        cfg: RunConfig,
        core: FedServerCore,
        *,
        run_id: Optional[str] = None,
        round_timeout: float = 600.0,
        phase_timeout: Optional[float] = None,
        public_context: Optional[bytes] = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        log: Callable[[str], Any] = print,
    ) -> None:
        self.cfg, self.core, self.log = cfg, core, log
        self.run_id = run_id or default_run_id(cfg)
        self.fingerprint = run_fingerprint(cfg)
        self.num_sites = cfg.data.partition.num_sites
        self.round_timeout = float(round_timeout)
        # fed.secure masks: the deadline of each step after AdvertiseKeys (whose deadline, the round's, covers training)
        self.phase_timeout = float(phase_timeout) if phase_timeout else self.round_timeout
        self.max_payload, self.chunk_size, self.replay_window = max_payload, chunk_size, replay_window
        self.public_context = public_context
        self.context_fp = b""
        if cfg.fed.secure == "he":
            if public_context is None:
                raise ValueError("fed.secure: he needs the consortium's public context on the server")
            self.context_fp = _context_fp(core.public_ctx)
        if core.site_sizes is None:
            core.site_sizes = [None] * self.num_sites  # type: ignore[list-item]
        self.cond = threading.Condition()
        self.serving = pb.SERVING_STATE_SERVING
        self.state = pb.ROUND_STATE_WAITING
        self.round = 0
        self.lr = 0.0
        self.chosen: list[int] = []
        self.deadline_ms = 0
        self.acc: Optional[RoundAcc] = None
        self.done_sites: set[int] = set()  # submitted (accepted or refused on receipt) this round
        self.outcomes: dict[int, pb.UpdateOutcome] = {}
        self.model_bytes = b""
        self.model_sha = b""
        self.decrypt_site: Optional[int] = None
        self.enc_bytes = b""
        self.enc_sha = b""
        self.decrypted: Optional[tuple[np.ndarray, float]] = None
        self.sessions: dict[int, _Session] = {}
        self.nonces: set[bytes] = set()
        self.epsilons: dict[int, float] = {}
        self.round_bytes_up = 0
        self.round_bytes_down = 0
        self.finished_told: set[int] = set()  # sites that have been told the run is over
        # fed.secure masks: this round's secure-aggregation messages (blobs in, answers out)
        self.sa_next = pb.SECAGG_MESSAGE_TYPE_UNSPECIFIED
        self.sa_in: dict[int, dict[int, bytes]] = {}
        self.sa_out: dict[int, Any] = {}
        self.sa_meta: dict[int, pb.SecAggSubmitMeta] = {}

    # ------------------------------------------------------------------ checks

    def _rh(self, seq: int = 0) -> pb.ResponseHeader:
        return pb.ResponseHeader(protocol_version=PROTOCOL_VERSION, sequence=seq, server_time_unix_ms=_now_ms())

    def _check(self, header: pb.RequestHeader, context: grpc.ServicerContext, *, opening: bool = False) -> int:
        """Version, run, site, session, sequence, in that order; the caller's site index."""

        if header.protocol_version not in SUPPORTED_VERSIONS:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                pb.ERROR_CODE_UNSUPPORTED_VERSION,
                f"protocol version {header.protocol_version} is not spoken here; supported: {list(SUPPORTED_VERSIONS)}",
                supported_versions=list(SUPPORTED_VERSIONS),
            )
        if header.run_id != self.run_id:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH,
                f"run id {header.run_id!r} is not this server's run {self.run_id!r}",
            )
        if header.config_fingerprint != self.fingerprint:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH,
                "configuration fingerprint differs from the server's: the site's config drifted (same config file?)",
            )
        site = site_index(authenticated_site(context))
        if site is None or site != header.site_id or site >= self.num_sites:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED, pb.ERROR_CODE_SITE_MISMATCH,
                f"header.site_id {header.site_id} is not the authenticated site ({authenticated_site(context)!r}) "
                f"or not one of the {self.num_sites} sites",
            )
        if opening:
            return site
        with self.cond:
            sess = self.sessions.get(site)
            if sess is None or header.session_id != sess.session_id:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_UNKNOWN_SESSION,
                    "unknown or replaced session: join again",
                )
            seq = header.sequence
            if seq < 1 or seq in sess.seen or seq <= sess.highest - self.replay_window:
                raise _Abort(
                    grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED,
                    f"sequence {seq} already used or older than the replay window (highest {sess.highest})",
                    highest_sequence=sess.highest,
                )

            jump = max_sequence_jump(self.replay_window)
            if seq > sess.highest + jump:  # would move the window past every genuine request still to come
                raise _Abort(
                    grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED,
                    f"sequence {seq} jumps more than {jump} ahead of the session's highest ({sess.highest}); "
                    "number requests 1, 2, 3, ... within a session (or join again for a new one)",
                    highest_sequence=sess.highest,
                )
            sess.seen.add(seq)
            sess.highest = max(sess.highest, seq)
            if len(sess.seen) > 4 * self.replay_window:  # forget what the window already refuses
                sess.seen = {s for s in sess.seen if s > sess.highest - self.replay_window}
        return site

    def _guard(self, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except _Abort as exc:
            _abort(context, exc)
        except ChunkError as exc:
            _abort(context, _chunk_abort(exc))
        except grpc.RpcError:
            raise
        except Exception as exc:  # a fault of ours: say so, keep serving the others
            self.log(f"[server] internal error in a call: {type(exc).__name__}: {exc}")
            _abort(context, _Abort(grpc.StatusCode.INTERNAL, pb.ERROR_CODE_UNSPECIFIED, f"internal server error: {type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ RPCs

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        h = request.header
        version = h.protocol_version if h.protocol_version in SUPPORTED_VERSIONS else max(SUPPORTED_VERSIONS)
        problem = ""
        if h.protocol_version not in SUPPORTED_VERSIONS:
            problem = f"protocol version {h.protocol_version} not supported"
        elif h.run_id and h.run_id != self.run_id:
            problem = f"run id {h.run_id!r} is not {self.run_id!r}"
        elif h.config_fingerprint and h.config_fingerprint != self.fingerprint:
            problem = "configuration fingerprint differs"
        return pb.StatusResponse(
            header=pb.ResponseHeader(protocol_version=version, server_time_unix_ms=_now_ms()),
            state=self.serving,
            supported_versions=list(SUPPORTED_VERSIONS),
            run_id=self.run_id,
            progress=self.round,
            header_ok=not problem,
            header_problem=problem,
            server_version=SERVER_VERSION,
        )

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> Iterator[pb.JoinResponse]:
        def opening() -> tuple[pb.FedRunInfo, bool]:
            site = self._check(request.header, context, opening=True)
            if len(request.client_nonce) != JOIN_NONCE_BYTES:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "client_nonce must be 16 random bytes")
            if request.sample_count < 1:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "sample_count must be positive")
            if self.cfg.fed.secure == "he" and request.context_fingerprint != self.context_fp:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH,
                    "the site's consortium context is not the one whose public part the server holds",
                )
            with self.cond:
                if request.client_nonce in self.nonces:
                    raise _Abort(grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED, "Join nonce seen before (replay)")
                known = self.core.site_sizes[site]
                if known is not None and known != request.sample_count:
                    raise _Abort(
                        grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_BAD_PAYLOAD,
                        f"site {site} joined before with {known} samples, now {request.sample_count}",
                    )
                self.nonces.add(bytes(request.client_nonce))
                self.core.site_sizes[site] = int(request.sample_count)
                sid = os.urandom(16)
                self.sessions[site] = _Session(sid)
                self.log(f"[server] site {site} joined ({request.sample_count} samples)")
                self.cond.notify_all()
                info = pb.FedRunInfo(
                    session=pb.SessionInfo(
                        session_id=sid, replay_window=self.replay_window, max_chunk_bytes=self.chunk_size,
                        max_payload_bytes=self.max_payload, server_version=SERVER_VERSION,
                    ),
                    regime=self.cfg.regime,
                    rounds_total=self.cfg.train.epochs,
                    num_sites=self.num_sites,
                    secure={"none": pb.SECURE_MODE_NONE, "he": pb.SECURE_MODE_HE, "masks": pb.SECURE_MODE_MASKS}[self.cfg.fed.secure],
                    model_size=self.core.size,
                    he_encrypted_length=self.core.encrypted_size,
                    he_value_bound=self._value_bound(),
                    context_fingerprint=self.context_fp,
                    public_context_size=len(self.public_context) if (request.want_public_context and self.public_context) else 0,
                )
            return info, bool(request.want_public_context and self.public_context)

        got = self._guard(context, opening)
        if got is None:
            return
        info, send_ctx = got
        yield pb.JoinResponse(header=self._rh(), run=info)
        if send_ctx:
            for chunk in split_payload(self.public_context, self.chunk_size):
                yield pb.JoinResponse(chunk=chunk)

    def _value_bound(self) -> float:
        if self.cfg.fed.secure != "he" or any(s is None for s in self.core.site_sizes):
            return 0.0
        return self.core.he_value_bound()

    def _round_info(self, site: int, seq: int) -> pb.RoundInfo:
        info = pb.RoundInfo(
            header=self._rh(seq),
            round=self.round,
            state=self.state,
            sampled=site in self.chosen and self.state == pb.ROUND_STATE_TRAINING and site not in self.done_sites,
            lr=self.lr,
            local_epochs=self.cfg.fed.local_epochs,
            mu=self.cfg.fed.mu if self.cfg.regime == "fedprox" else 0.0,
            deadline_unix_ms=self.deadline_ms,
            retry_after_ms=200,
            he_value_bound=self._value_bound(),
            secagg_next=self.sa_next if site in self.chosen else pb.SECAGG_MESSAGE_TYPE_UNSPECIFIED,
        )
        if self.state == pb.ROUND_STATE_TRAINING and site in self.chosen:
            info.downloads.append(
                pb.PayloadDescriptor(part=pb.MODEL_PART_GLOBAL_MODEL, round=self.round, size=len(self.model_bytes), sha256=self.model_sha)
            )
        if self.state == pb.ROUND_STATE_AGGREGATING and self.decrypt_site == site and self.decrypted is None:
            info.decrypt_aggregate = True
            info.downloads.append(
                pb.PayloadDescriptor(part=pb.MODEL_PART_ENCRYPTED_AGGREGATE, round=self.round, size=len(self.enc_bytes), sha256=self.enc_sha)
            )
        if site in self.outcomes:
            info.last_outcome.CopyFrom(self.outcomes[site])
        return info

    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.RoundInfo:
        def handle() -> pb.RoundInfo:
            site = self._check(request.header, context)
            wait_until = time.monotonic() + min(request.max_wait_ms, 60_000) / 1000.0

            def ready() -> bool:
                if self.state == pb.ROUND_STATE_FINISHED:
                    return True
                if self.state == pb.ROUND_STATE_AGGREGATING and self.decrypt_site == site and self.decrypted is None:
                    return True
                return self.state == pb.ROUND_STATE_TRAINING and self.round >= request.min_round

            with self.cond:
                while not ready() and context.is_active():
                    left = wait_until - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(min(left, 1.0))
                if self.state == pb.ROUND_STATE_FINISHED:
                    self.finished_told.add(site)
                    self.cond.notify_all()
                return self._round_info(site, request.header.sequence)

        return self._guard(context, handle)

    def DownloadModel(self, request: pb.DownloadModelRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadModelResponse]:
        def opening() -> tuple[bytes, pb.PayloadDescriptor]:
            site = self._check(request.header, context)
            with self.cond:
                if request.part == pb.MODEL_PART_GLOBAL_MODEL:
                    if self.state != pb.ROUND_STATE_TRAINING or request.round != self.round:
                        raise _Abort(
                            grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                            f"round {request.round} is not open for training (round {self.round})", retry_after_ms=200,
                        )
                    if site not in self.chosen:
                        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_NOT_SAMPLED, f"site {site} is not sampled in round {self.round}")
                    data, sha = self.model_bytes, self.model_sha
                elif request.part == pb.MODEL_PART_ENCRYPTED_AGGREGATE:
                    if not (self.state == pb.ROUND_STATE_AGGREGATING and self.decrypt_site == site and request.round == self.round):
                        raise _Abort(
                            grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                            f"site {site} is not asked to decrypt round {request.round}'s aggregate",
                        )
                    data, sha = self.enc_bytes, self.enc_sha
                else:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, f"model part {request.part} is not served")
                self.round_bytes_down += len(data)
            return data, pb.PayloadDescriptor(part=request.part, round=request.round, size=len(data), sha256=sha)

        got = self._guard(context, opening)
        if got is None:
            return
        data, desc = got
        yield pb.DownloadModelResponse(header=self._rh(request.header.sequence), descriptor=desc)
        for chunk in split_payload(data, self.chunk_size):
            yield pb.DownloadModelResponse(chunk=chunk)

    def SubmitUpdate(self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext) -> pb.SubmitUpdateResponse:
        def handle() -> pb.SubmitUpdateResponse:
            first, chunks = open_stream(request_iterator, ("header", "meta"))
            if not first.HasField("header") or not first.HasField("meta"):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_CHUNKS, "the first message must carry header and meta")
            site = self._check(first.header, context)
            meta = first.meta
            seq = first.header.sequence
            encodings = [p.encoding for p in meta.parts]
            decrypting = encodings == [pb.UPDATE_ENCODING_DECRYPTED_MEAN]
            with self.cond:
                if decrypting:
                    if not (self.state == pb.ROUND_STATE_AGGREGATING and self.decrypt_site == site and meta.round == self.round and self.decrypted is None):
                        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, "no decrypted mean is expected from this site now")
                else:
                    self._check_submission(site, meta)
            total = 0
            for p in meta.parts:
                if p.size > self.max_payload:
                    raise _Abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, pb.ERROR_CODE_TOO_LARGE,
                        f"declared part size {p.size} bytes is over the limit of {self.max_payload}", transfer_id=p.transfer_id,
                    )
                total += p.size
            if total > self.max_payload:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, pb.ERROR_CODE_TOO_LARGE, f"declared update size {total} bytes is over the limit")
            payloads: dict[int, bytes] = {}
            for p in meta.parts:
                buf = io.BytesIO()
                info = read_transfer(chunks, int(p.size), buf.write, max_chunk_bytes=self.chunk_size, transfer_id=bytes(p.transfer_id) or None)
                if info.size != p.size:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_CHUNKS, f"part declared {p.size} bytes, its transfer {info.size}")
                payloads[p.encoding] = buf.getvalue()
            extra = next(chunks, None)
            if extra is not None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_CHUNKS, "chunks after the last declared part")
            if decrypting:
                return self._take_decrypted(site, meta, payloads[pb.UPDATE_ENCODING_DECRYPTED_MEAN], seq, total)
            return self._take_update(site, meta, payloads, seq, total)

        return self._guard(context, handle)

    _SA_SUBMIT = (
        pb.SECAGG_MESSAGE_TYPE_ADVERTISE_KEYS, pb.SECAGG_MESSAGE_TYPE_SHARE_KEYS,
        pb.SECAGG_MESSAGE_TYPE_MASKED_INPUT, pb.SECAGG_MESSAGE_TYPE_UNMASK_RESPONSE,
    )

    def SecAggSubmit(self, request_iterator: Iterator[pb.SecAggSubmitRequest], context: grpc.ServicerContext) -> pb.SecAggSubmitResponse:
        def handle() -> pb.SecAggSubmitResponse:
            first, chunks = open_stream(request_iterator, ("header", "meta"))
            if not first.HasField("header") or not first.HasField("meta"):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_CHUNKS, "the first message must carry header and meta")
            site = self._check(first.header, context)
            meta = first.meta

            def expected() -> None:
                if self.cfg.fed.secure != "masks" or meta.type not in self._SA_SUBMIT:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, "no secure-aggregation message is expected")
                if self.state != pb.ROUND_STATE_TRAINING or meta.round != self.round or meta.type != self.sa_next:
                    raise _Abort(
                        grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                        f"secure-aggregation message {meta.type} for round {meta.round} is not expected now "
                        f"(round {self.round}, expecting {self.sa_next})",
                    )
                if site not in self.chosen:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_NOT_SAMPLED, f"site {site} is not sampled")
                if site in self.sa_in.get(meta.type, {}):
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, "this message was already sent")

            with self.cond:
                expected()
            buf = io.BytesIO()
            read_transfer(chunks, self.max_payload, buf.write, max_chunk_bytes=self.chunk_size)
            if next(chunks, None) is not None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_CHUNKS, "chunks after the message")
            blob = buf.getvalue()
            with self.cond:
                expected()
                if _now_ms() > self.deadline_ms:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_DEADLINE_PASSED, "the phase's deadline passed")
                self.sa_in.setdefault(meta.type, {})[site] = blob
                if meta.type == pb.SECAGG_MESSAGE_TYPE_MASKED_INPUT:
                    self.sa_meta[site] = meta
                self.round_bytes_up += len(blob)
                self.cond.notify_all()
            return pb.SecAggSubmitResponse(header=self._rh(first.header.sequence), accepted=True)

        return self._guard(context, handle)

    def SecAggFetch(self, request: pb.SecAggFetchRequest, context: grpc.ServicerContext) -> Iterator[pb.SecAggFetchResponse]:
        def opening() -> Optional[bytes]:
            site = self._check(request.header, context)
            wanted = (pb.SECAGG_MESSAGE_TYPE_KEY_BROADCAST, pb.SECAGG_MESSAGE_TYPE_SHARE_DELIVERY, pb.SECAGG_MESSAGE_TYPE_UNMASK_REQUEST)
            if request.type not in wanted:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, f"message type {request.type} cannot be fetched")
            wait_until = time.monotonic() + min(request.max_wait_ms, 60_000) / 1000.0

            def get() -> Optional[bytes]:
                if request.round != self.round:
                    return None
                out = self.sa_out.get(request.type)
                if isinstance(out, dict):
                    return out.get(site)
                return out

            with self.cond:
                if request.round == self.round and site not in self.chosen:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_NOT_SAMPLED, f"site {site} is not sampled")
                while get() is None and context.is_active() and time.monotonic() < wait_until:
                    self.cond.wait(min(wait_until - time.monotonic(), 1.0))
                data = get()
                if data is not None:
                    self.round_bytes_down += len(data)
                elif request.round != self.round or self.state != pb.ROUND_STATE_TRAINING:
                    raise _Abort(
                        grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                        f"the secure aggregation of round {request.round + 1} is over (server in round {self.round + 1})",
                    )
                return data

        got = self._guard(context, opening)
        header = self._rh(request.header.sequence)
        if got is None:
            if context.is_active():
                yield pb.SecAggFetchResponse(header=header, status=pb.SecAggFetchStatus(ready=False, retry_after_ms=200))
            return
        yield pb.SecAggFetchResponse(header=header, status=pb.SecAggFetchStatus(ready=True))
        for chunk in split_payload(got, self.chunk_size):
            yield pb.SecAggFetchResponse(chunk=chunk)

    def _check_submission(self, site: int, meta: pb.UpdateMeta) -> None:
        """Under the lock: is an update from ``site`` for ``meta.round`` expected now?"""
        if meta.round == self.round and self.state == pb.ROUND_STATE_AGGREGATING:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_DEADLINE_PASSED, f"round {meta.round} is closed (deadline passed)")
        if self.state == pb.ROUND_STATE_FINISHED:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, "the run is over: no more rounds")
        if self.state != pb.ROUND_STATE_TRAINING or meta.round != self.round:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                f"round {meta.round} is not open for updates (the server is in round {self.round})",
            )
        if site not in self.chosen:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_NOT_SAMPLED, f"site {site} is not sampled in round {self.round}")
        if site in self.done_sites:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, f"site {site} already submitted round {self.round}")
        if meta.sample_count != self.core.site_sizes[site]:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD,
                f"sample_count {meta.sample_count} is not the {self.core.site_sizes[site]} the site joined with",
            )
        want = (
            {pb.UPDATE_ENCODING_FLOAT32, pb.UPDATE_ENCODING_CKKS} if self.cfg.fed.secure == "he"
            else {pb.UPDATE_ENCODING_TOPK} if self.cfg.fed.topk_fraction > 0 else {pb.UPDATE_ENCODING_FLOAT32}
        )
        got = [p.encoding for p in meta.parts]
        if sorted(got) != sorted(want):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, f"update parts {got} are not the expected {sorted(want)}")

    def _take_update(self, site: int, meta: pb.UpdateMeta, payloads: dict[int, bytes], seq: int, total: int) -> pb.SubmitUpdateResponse:
        with self.cond:
            self._check_submission(site, meta)  # again: the round may have closed while the payload streamed
            if _now_ms() > self.deadline_ms:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_DEADLINE_PASSED, "the round's deadline passed during the upload")
            acc = self.acc
            assert acc is not None
            plain = payloads.get(pb.UPDATE_ENCODING_FLOAT32, payloads.get(pb.UPDATE_ENCODING_TOPK, b""))
            enc = payloads.get(pb.UPDATE_ENCODING_CKKS)
            self.done_sites.add(site)
            self.round_bytes_up += total
            if meta.HasField("train_loss"):
                acc.losses[site] = float(meta.train_loss)
            if meta.HasField("epsilon"):
                self.epsilons[site] = float(meta.epsilon)
            reason = ""
            try:
                self.core.receive(acc, site, plain, enc)
            except ValueError as exc:  # HEError is a ValueError too
                reason = str(exc)
                self.core.reject(acc.round_index, site, reason)
                self.outcomes[site] = pb.UpdateOutcome(round=acc.round_index, accepted=False, reason=reason)
            self.cond.notify_all()
        return pb.SubmitUpdateResponse(header=self._rh(seq), accepted=not reason, reason=reason, bytes_received=total)

    def _take_decrypted(self, site: int, meta: pb.UpdateMeta, payload: bytes, seq: int, total: int) -> pb.SubmitUpdateResponse:
        try:
            mean = vector_from_bytes(payload, f"site {site} decrypted mean", self.core.encrypted_size)
        except Exception as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, f"decrypted mean: {exc}") from None
        if not np.all(np.isfinite(mean)):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "decrypted mean has non-finite values")
        with self.cond:
            if self.decrypt_site != site or self.decrypted is not None or meta.round != self.round:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, "no decrypted mean is expected from this site now")
            self.decrypted = (mean, float(meta.sample_count))
            self.round_bytes_up += total
            self.cond.notify_all()
        return pb.SubmitUpdateResponse(header=self._rh(seq), accepted=True, bytes_received=total)

    # ------------------------------------------------------------------ the coordinator's side

    def wait_for_sites(self, timeout: float, round_index: int = 0) -> None:
        """Block until every site has joined once (their public sample counts are needed); RunError after ``timeout``.

        A site that joins late, within ``timeout``, is served like the others; the error (raised before the
        round opens, so nothing is recorded) names the sites that never joined and the option to raise.
        """
        started = time.monotonic()
        deadline = started + timeout
        with self.cond:
            while any(s is None for s in self.core.site_sizes):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [site_name(i) for i, s in enumerate(self.core.site_sizes) if s is None]
                    came = [site_name(i) for i, s in enumerate(self.core.site_sizes) if s is not None]
                    raise RunError(
                        f"site(s) {', '.join(missing)} never joined: waited {time.monotonic() - started:.0f} s (join "
                        f"timeout {timeout:g} s) for all {self.num_sites} sites before round {round_index + 1}; "
                        f"joined: {', '.join(came) or 'none'}. No round was run or recorded. Start the missing sites "
                        "(`splitfl join --site N ...`, same config, this server's address) and rerun with the same "
                        "--out, or give them longer to start with --join-timeout")
                self.cond.wait(min(left, 1.0))

    def run_round(self, round_index: int, lr: float) -> tuple[float, dict[str, Any]]:
        """One federated round over the network; returns (training loss, the round's extras)."""
        core, fed = self.core, self.cfg.fed
        chosen = core.sample_sites(round_index)
        with self.cond:
            self.round, self.lr, self.chosen = round_index, float(lr), chosen
            self.acc = core.begin_round(round_index, chosen)
            self.model_bytes = vector_bytes(core.global_flat)
            self.model_sha = hashlib.sha256(self.model_bytes).digest()
            self.done_sites = set()
            self.decrypt_site, self.enc_bytes, self.enc_sha, self.decrypted = None, b"", b"", None
            self.round_bytes_up = self.round_bytes_down = 0
            self.deadline_ms = _now_ms() + int(self.round_timeout * 1000)
            self.sa_in, self.sa_out, self.sa_meta = {}, {}, {}
            self.sa_next = pb.SECAGG_MESSAGE_TYPE_ADVERTISE_KEYS if fed.secure == "masks" else pb.SECAGG_MESSAGE_TYPE_UNSPECIFIED
            self.state = pb.ROUND_STATE_TRAINING
            self.log(f"[server] round {round_index + 1}: sampled sites {chosen}, deadline {self.round_timeout:.0f} s")
            self.cond.notify_all()
        if fed.secure == "masks":
            return self._masked_round(round_index, chosen)
        with self.cond:
            while not set(chosen) <= self.done_sites:
                left = (self.deadline_ms - _now_ms()) / 1000.0
                if left <= 0:
                    break
                self.cond.wait(min(left, 1.0))
            self.state = pb.ROUND_STATE_AGGREGATING
            missing = sorted(set(chosen) - self.done_sites)
            acc = self.acc
            self.cond.notify_all()
        for site in missing:
            self.log(f"[server] round {round_index + 1}: site {site} did not submit before the deadline; dropped from this round")
        accepted = core.screen(acc)
        with self.cond:
            for site in acc.plain:
                self.outcomes[site] = pb.UpdateOutcome(
                    round=round_index, accepted=site in accepted,
                    reason="" if site in accepted else next((r.reason for r in reversed(core.rejections) if r.site == site and r.round == round_index + 1), "rejected"),
                )
        update = None
        if len(accepted) >= fed.min_sites:
            update, summed = core.aggregate(acc, accepted)
            if summed is not None:
                update = self._decrypt_remotely(acc, accepted, update, summed)
        core.apply(update, accepted)
        with self.cond:
            up, down = self.round_bytes_up, self.round_bytes_down
        core.bytes_up += up
        core.bytes_down += down
        core.rounds_done += 1
        losses = [acc.losses[s] for s in chosen if s in acc.losses]
        counts = [core.site_count(s) for s in chosen if s in acc.losses]
        extras = {"sites": len(chosen), "accepted": len(accepted), "bytes_up": up, "bytes_down": down}
        self.log(f"[server] round {round_index + 1}: {len(accepted)} update(s) accepted of {len(chosen)} sampled")
        return (float(np.average(losses, weights=counts)) if losses else math.nan), extras

    def _sa_collect(self, kind: int, expected: list[int], next_kind: int) -> dict[int, bytes]:
        """Under the lock: wait until every site in ``expected`` sent its ``kind`` message or the phase's deadline passes."""
        with self.cond:
            while not set(expected) <= set(self.sa_in.get(kind, {})):
                left = (self.deadline_ms - _now_ms()) / 1000.0
                if left <= 0:
                    break
                self.cond.wait(min(left, 1.0))
            got = dict(self.sa_in.get(kind, {}))
            self.sa_next = next_kind
            self.deadline_ms = _now_ms() + int(self.phase_timeout * 1000)  # the next phase's deadline
            return got

    def _masked_round(self, round_index: int, chosen: list[int]) -> tuple[float, dict[str, Any]]:
        """fed.secure masks: Bonawitz et al. over SecAggSubmit / SecAggFetch; the server learns only the sum."""

        core, fed, r = self.core, self.cfg.fed, round_index
        adv = self._sa_collect(pb.SECAGG_MESSAGE_TYPE_ADVERTISE_KEYS, chosen, pb.SECAGG_MESSAGE_TYPE_SHARE_KEYS)
        u1 = sorted(adv)
        for site in sorted(set(chosen) - set(u1)):
            self.log(f"[server] round {r + 1}: site {site} sent no keys before the deadline; dropped from this round")
        mean: Optional[np.ndarray] = None
        survivors: list[int] = []
        try:
            if len(u1) < max(fed.min_sites, 2):  # a "sum" of one site would be that site's update
                raise sa.SecAggError(f"{len(u1)} site(s) advertised keys; secure aggregation needs at least {max(fed.min_sites, 2)}")
            threshold = min(fed.secagg_threshold or (len(u1) // 2 + 1), len(u1))
            server = sa.SecAggServer(len(u1), threshold, core.size, r)
            for site in u1:
                server.receive_keys(sa.AdvertiseKeys.from_bytes(adv[site]))
            with self.cond:
                self.sa_out[pb.SECAGG_MESSAGE_TYPE_KEY_BROADCAST] = server.broadcast_keys().to_bytes()
                self.cond.notify_all()
            shares = self._sa_collect(pb.SECAGG_MESSAGE_TYPE_SHARE_KEYS, u1, pb.SECAGG_MESSAGE_TYPE_MASKED_INPUT)
            for site in sorted(shares):
                server.receive_shares(sa.ShareKeys.from_bytes(shares[site]))
            deliveries = server.deliver_shares()
            with self.cond:
                self.sa_out[pb.SECAGG_MESSAGE_TYPE_SHARE_DELIVERY] = {s: m.to_bytes() for s, m in deliveries.items()}
                self.cond.notify_all()
            masked = self._sa_collect(pb.SECAGG_MESSAGE_TYPE_MASKED_INPUT, sorted(deliveries), pb.SECAGG_MESSAGE_TYPE_UNMASK_RESPONSE)
            for site in sorted(masked):
                server.receive_masked_input(sa.MaskedInput.from_bytes(masked[site]))
            request = server.unmask_request()
            with self.cond:
                self.sa_out[pb.SECAGG_MESSAGE_TYPE_UNMASK_REQUEST] = request.to_bytes()
                self.cond.notify_all()
            unmask = self._sa_collect(pb.SECAGG_MESSAGE_TYPE_UNMASK_RESPONSE, list(request.survivors), pb.SECAGG_MESSAGE_TYPE_UNSPECIFIED)
            for site in sorted(unmask):
                server.receive_unmask(sa.UnmaskResponse.from_bytes(unmask[site]))
            survivors = sorted(server.survivors)
            if len(survivors) >= fed.min_sites:
                mean = (server.result() / sum(core.site_count(s) for s in survivors)).astype(np.float32)
        except sa.SecAggError as exc:
            self.log(f"[server] round {r + 1}: secure aggregation failed: {exc}")
        with self.cond:
            self.state = pb.ROUND_STATE_AGGREGATING
            self.sa_next = pb.SECAGG_MESSAGE_TYPE_UNSPECIFIED
            metas = dict(self.sa_meta)
            self.cond.notify_all()
        core.apply(mean, survivors)
        with self.cond:
            up, down = self.round_bytes_up, self.round_bytes_down
        core.bytes_up += up
        core.bytes_down += down
        core.rounds_done += 1
        losses = [metas[s].train_loss for s in chosen if s in metas and metas[s].HasField("train_loss")]
        counts = [core.site_count(s) for s in chosen if s in metas and metas[s].HasField("train_loss")]
        for s, m in metas.items():
            if m.HasField("epsilon"):
                self.epsilons[s] = float(m.epsilon)
        self.log(f"[server] round {r + 1}: masked sum of {len(survivors)} update(s) of {len(chosen)} sampled")
        extras = {"sites": len(chosen), "accepted": len(survivors), "bytes_up": up, "bytes_down": down}
        return (float(np.average(losses, weights=counts)) if losses else math.nan), extras

    def _decrypt_remotely(self, acc: RoundAcc, accepted: list[int], partial: np.ndarray, summed: bytes) -> Optional[np.ndarray]:
        """Ask the accepted sites in turn (key holders) to decrypt the sum; the aggregate, or None if none answered."""
        for holder in accepted:
            with self.cond:
                self.decrypt_site, self.enc_bytes, self.decrypted = holder, summed, None
                self.enc_sha = hashlib.sha256(summed).digest()
                deadline = time.monotonic() + self.round_timeout
                self.cond.notify_all()
                while self.decrypted is None and time.monotonic() < deadline:
                    self.cond.wait(1.0)
                got = self.decrypted
                self.decrypt_site = None
            if got is None:
                self.log(f"[server] round {acc.round_index + 1}: site {holder} did not return the decrypted aggregate in time")
                continue
            try:
                return self.core.complete_he(acc, accepted, partial, got[0], got[1])
            except (ValueError, RuntimeError) as exc:
                self.log(f"[server] round {acc.round_index + 1}: decrypted aggregate from site {holder} refused: {exc}")
        return None

    def finish(self) -> None:
        with self.cond:
            self.state = pb.ROUND_STATE_FINISHED
            self.serving = pb.SERVING_STATE_FINISHED
            self.cond.notify_all()


def make_server(
    servicer: FederationServer,
    address: str,
    pki_dir: Optional[str | Path],
    insecure: bool,
    max_workers: Optional[int] = None,
) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``servicer`` on ``address`` (mutual TLS + site tokens; plaintext only if ``insecure``).

    ``pki_dir`` is the server's own folder (``DIR/server`` of ``splitfl certs``), never the whole PKI: see
    :func:`splitfl.net.certs.load_server_folder`, which refuses a folder holding a secret. ``max_workers``
    defaults to 8 + 2 per site: every site long-polls ``GetRound`` and holds a handler thread while it waits, so a
    fixed pool (it was 32) starved a round of 128 sites: their uploads, the aggregate's download and the
    decrypted mean queued behind the polls (GetRound p50 13 s, the decryption step 45 s; bench clinic-load).
    """
    if max_workers is None:
        max_workers = 8 + 2 * servicer.num_sites
    if pki_dir is None:
        raise PkiError("the server needs --pki: its own folder from `splitfl certs --out DIR` (DIR/server: its "
                       "certificate and key, the CA certificate, the sites' token hashes)")
    own = load_server_folder(pki_dir, require_tls=not insecure)  # refuses a folder holding any secret
    interceptor = SiteAuthInterceptor(own.tokens, require_peer_cert=not insecure, exempt=STATUS_METHODS)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=[interceptor])
    pb_grpc.add_FederationServiceServicer_to_server(servicer, server)
    port = add_server_port(server, address, None if insecure else server_credentials(own), insecure=insecure)
    server.start()
    return server, port
