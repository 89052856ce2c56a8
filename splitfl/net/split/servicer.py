"""The server's gRPC face: :class:`SplitServicer` (``splitfl.v1.SplitService``) and :func:`serve` (mutual TLS).

Every call is checked in the protocol's order (token + client certificate by
:class:`~splitfl.net.tls.SiteAuthInterceptor`, then version, run id + config fingerprint, site, session,
sequence) before any payload is read; payloads are chunk streams (:mod:`splitfl.net.chunks`). What passes is
handed to the head (:class:`~splitfl.split.server.SplitServer`, or in split-he-full a
:class:`~splitfl.split.full_server.FullSplitServer`) and to the
:class:`~splitfl.net.split.coordinator.Coordinator`, which says who may act when. It is kept apart from the
server's epoch loop (:mod:`~splitfl.net.split.server`) so the service can be started and probed on its own.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterator, Optional

import grpc
import torch

from splitfl.artifacts import write_bytes
from splitfl.he import HEError
from splitfl.he.encrypted_head import FullHeadLayout
from splitfl.he.keys import context_fingerprint, engine_for, load_public_context
from splitfl.he.parallel import CKKSWorkers, resolve_workers
from splitfl.net import (
    DEFAULT_CHUNK_SIZE,
    STATUS_METHODS,
    SUPPORTED_VERSIONS,
    ChunkError,
    assemble,
    open_stream,
    split_payload,
)
from splitfl.net.certs import load_server_folder
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pbg
from splitfl.net.split.common import (
    _MODES,
    _PB_MODES,
    _WIRE,
    MAX_CONTEXT_BYTES,
    MAX_PAYLOAD_BYTES,
    SERVER_VERSION,
    _Abort,
    _abort,
    _fp_bytes,
    _resp_header,
    config_fingerprint,
    site_name,
)
from splitfl.net.split.coordinator import RELEASE, Coordinator, _Sessions
from splitfl.net.tls import SiteAuthInterceptor, add_server_port, authenticated_site, server_credentials
from splitfl.split.full_server import FullSplitServer
from splitfl.split.server import SplitServer
from splitfl.tensors import ProtocolError


class SplitServicer(pbg.SplitServiceServicer):
    """``SplitService`` around a :class:`SplitServer` built on the head (made when the context arrives in split-he).

    split-he-full: around a :class:`~splitfl.split.full_server.FullSplitServer`, made when a hospital has
    uploaded the public context and then the initial ``enc(W)`` (a checkpointed head, if any, is put over it).
    """

    def __init__(self, cfg: Any, run_id: str, head: torch.nn.Module, head_opt: Any, head_sched: Any,
                 coordinator: Coordinator, *, authenticated: bool = True, recorder: Any = None) -> None:
        self.cfg, self.run_id, self.fp = cfg, run_id, config_fingerprint(cfg)
        self.mode = _MODES[cfg.regime]
        self.head, self.head_opt, self.head_sched = head, head_opt, head_sched
        self.coord = coordinator
        self.authenticated = authenticated
        self.recorder = recorder
        self.sessions = _Sessions()
        self.lock = threading.RLock()  # one SplitServer operation at a time
        self.layers = list(head.linear_layers()) if hasattr(head, "linear_layers") else [head]
        self.server: Optional[Any] = None  # SplitServer, or FullSplitServer in split-he-full
        if self.mode == "plain":
            self.server = SplitServer(head, head_opt, head_sched, "plain", recorder=recorder)
        self.context_fp = b""
        # split-he-full: the public context until the initial enc(W) arrives, its slots, and a checkpoint's
        # head state (FullSplitServer.state_dict) waiting for the head to be built.
        self.full_context: Optional[bytes] = None
        self.full_slots = 0
        self.full_pending: Optional[dict[str, Any]] = None
        self.bytes_up = self.bytes_down = 0

    # ---------------------------------------------------------------- checks

    def _site(self, header: Any, context: grpc.ServicerContext, *, hello: bool = False) -> int:
        if header.protocol_version not in SUPPORTED_VERSIONS:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_UNSUPPORTED_VERSION,
                         f"protocol version {header.protocol_version} is not spoken here",
                         supported_versions=list(SUPPORTED_VERSIONS))
        if header.run_id != self.run_id or header.config_fingerprint != self.fp:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH,
                         f"run {header.run_id!r} / config fingerprint {bytes(header.config_fingerprint).hex()[:16]} "
                         f"is not this server's run {self.run_id!r} / {self.fp.hex()[:16]}")
        site = int(header.site_id)
        if site >= self.coord.num_sites:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, pb.ERROR_CODE_SITE_MISMATCH, f"no site {site} in this run")
        if self.authenticated:
            who = authenticated_site(context)
            if who != site_name(site):
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED, pb.ERROR_CODE_SITE_MISMATCH,
                             f"the call is authenticated as {who!r}, not {site_name(site)!r}")
        if not hello:
            self.sessions.check(site, bytes(header.session_id), int(header.sequence))
            with self.coord.cond:
                self.coord.seen(site)
        return site

    def _payload(self, chunks: Iterator[Any], limit: int = MAX_PAYLOAD_BYTES) -> bytes:
        try:
            return assemble(chunks, limit, max_chunk_bytes=DEFAULT_CHUNK_SIZE)
        except ChunkError as e:
            raise _Abort(getattr(grpc.StatusCode, e.grpc_code), e.error_code, str(e),
                         transfer_id=e.transfer_id, chunk_index=e.index) from None

    def _open(self, request_iterator: Iterator[Any], first_only: tuple[str, ...]) -> tuple[Any, Iterator[Any]]:
        try:
            return open_stream(request_iterator, first_only)
        except ChunkError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_CHUNKS, str(e)) from None

    def _need_server(self) -> Any:
        if self.server is None:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         "split-he-full: the server holds no encrypted head yet: a hospital must UploadContext, then "
                         "UploadWeights (INITIAL) before any training or evaluation" if self.mode == "full" else
                         "the server has no public context yet: UploadContext first", retry_after_ms=500)
        return self.server

    def _not_full(self, what: str) -> None:
        if self.mode == "full":
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         f"{what} does not exist in split-he-full (Backward updates enc(W) on ciphertexts)")

    def _full_only(self, what: str) -> None:
        if self.mode != "full":
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         f"{what}: only split-he-full holds encrypted weights (this server runs {self.cfg.regime})")

    def _layer_kw(self, layer: int) -> dict[str, int]:
        """The ``layer`` argument of SplitServer's calls; FullSplitServer's head is one layer and takes none."""
        if self.mode != "full":
            return {"layer": layer}
        if layer != 0:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD,
                         f"layer {layer}: the split-he-full head is one encrypted linear layer (layer 0)")
        return {}

    def _check_full_context(self, data: bytes) -> tuple[int, bytes]:
        """split-he-full: (slots, fingerprint) of a public context fit for the encrypted head (HEError if not)."""

        ctx = load_public_context(data)  # refuses a context that can decrypt
        eng = engine_for(ctx)
        lin = self.layers[0]
        FullHeadLayout(lin.in_features, lin.out_features, self.cfg.train.batch_size, eng.slots)  # batch fits the slots
        if eng.levels < 1:
            raise HEError("the context has no rescaling level; split-he-full rescales each product once (preset full)")
        if not ctx.has_relin_keys():
            raise HEError("split-he-full needs relinearisation keys in the public context "
                          "(splitfl.he.encrypted_head.full_public_context_bytes)")
        return eng.slots, _fp_bytes(context_fingerprint(ctx))

    def _write_public_context(self, data: bytes) -> None:
        """The context the server holds, next to its transcript, so the transcript can be read as it was held."""
        if self.recorder is not None:
            write_bytes(self.recorder.folder / "server_public_context.bin", data, 0o644)

    # ---------------------------------------------------------------- split-he-full: the head's state

    def full_state(self) -> Optional[dict[str, Any]]:
        """The encrypted head as held (enc(W) and its update/refresh counters), for the server's checkpoint."""
        with self.lock:
            return self.server.state_dict() if self.server is not None else self.full_pending

    def load_full_state(self, state: Optional[dict[str, Any]]) -> None:
        """Resume: put a checkpointed head over the current one, or keep it until the head is built."""
        if state is None:
            return
        with self.lock:
            if self.server is not None:
                self.server.load_state_dict(state)
            else:
                self.full_pending = state

    def restore_full_weights(self, payload: bytes) -> None:
        """The best epoch's enc(W), exported by this server then, back in place for the final test."""
        with self.lock:
            if self.server is None:
                raise RuntimeError("restore_full_weights before the encrypted head was built")
            self.server.restore_weights(payload, fresh=False)

    def full_counters(self) -> dict[str, int]:
        """metrics.json's head_updates / head_refreshes / refresh_every, as the in-process run reports them."""
        with self.lock:
            if self.server is not None:
                head = self.server.head
                return {"head_updates": head.updates, "head_refreshes": head.refreshes, "refresh_every": head.refresh_every}
            state = self.full_pending or {}
        return {"head_updates": int(state.get("updates", 0)), "head_refreshes": int(state.get("refreshes", 0)),
                "refresh_every": self.cfg.split.full_refresh_every}

    def _encoding(self, got: int, want: int) -> None:
        if got != want:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD,
                         f"payload encoding {pb.PayloadEncoding.Name(got)} where this {self.mode} server expects "
                         f"{pb.PayloadEncoding.Name(want)}")

    def _run(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (ProtocolError, HEError) as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, str(e)) from None

    def _wire(self) -> int:
        return _WIRE[self.mode]

    @staticmethod
    def _reply(message: Any, seq: int, payload: bytes, **first_fields: Any) -> Iterator[Any]:
        """The chunks of ``payload``; the first message also carries the header and ``first_fields``."""
        first = True
        for c in split_payload(payload):
            yield message(header=_resp_header(seq), chunk=c, **first_fields) if first else message(chunk=c)
            first = False

    def _guard(fn: Callable) -> Callable:  # a decorator of the methods below
        def unary(self: "SplitServicer", request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(self, request, context)
            except _Abort as a:
                _abort(context, a)

        unary.__name__ = fn.__name__
        return unary

    def _guard_stream(fn: Callable) -> Callable:  # a decorator of the methods below
        def stream(self: "SplitServicer", request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(self, request, context)
            except _Abort as a:
                _abort(context, a)

        stream.__name__ = fn.__name__
        return stream

    # ---------------------------------------------------------------- RPCs

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        h = request.header
        ok, problem = True, ""
        if h.protocol_version not in SUPPORTED_VERSIONS:
            ok, problem = False, f"protocol version {h.protocol_version} is not spoken here"
        elif h.run_id and (h.run_id != self.run_id or (h.config_fingerprint and h.config_fingerprint != self.fp)):
            ok, problem = False, "run id or config fingerprint differ from this server's"
        state = {"starting": pb.SERVING_STATE_SERVING, "train": pb.SERVING_STATE_SERVING,
                 "between": pb.SERVING_STATE_SERVING, "done": pb.SERVING_STATE_FINISHED}[self.coord.phase]
        return pb.StatusResponse(header=_resp_header(0), state=state, supported_versions=list(SUPPORTED_VERSIONS),
                                 run_id=self.run_id, progress=self.coord.epoch, header_ok=ok, header_problem=problem,
                                 server_version=SERVER_VERSION)

    @_guard
    def Hello(self, request: Any, context: grpc.ServicerContext) -> Any:
        site = self._site(request.header, context, hello=True)
        if request.feature_dim and request.feature_dim != self.layers[0].in_features:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH,
                         f"encoder width {request.feature_dim} != head input {self.layers[0].in_features}")
        with self.lock:
            if self.mode != "plain" and self.context_fp and request.context_fingerprint != self.context_fp:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH,
                             "the hospital encrypts under another consortium context than the server holds")
            sid = self.sessions.open(site, bytes(request.client_nonce))
            srv = self.server
            full = self.mode == "full"
            slots = self.full_slots if full else (srv.he.slots if (srv is not None and srv.he is not None) else 0)
            predict = bool(srv is not None and getattr(srv, "he_mlp", None) is not None
                           and srv.context is not None and srv.context.has_galois_keys())
            context_needed = self.full_context is None if full else (self.mode == "he" and srv is None)
        return pb.SplitHelloResponse(
            header=_resp_header(0),
            session=pb.SessionInfo(session_id=sid, replay_window=self.sessions.window, max_chunk_bytes=DEFAULT_CHUNK_SIZE,
                                   max_payload_bytes=MAX_PAYLOAD_BYTES, server_version=SERVER_VERSION),
            mode=_PB_MODES[self.mode],
            layers=[pb.HeadLayer(in_features=l.in_features, out_features=l.out_features) for l in self.layers],
            batch_capacity=self.cfg.train.batch_size, slots=slots, predict_available=predict,
            context_needed=context_needed, num_sites=self.coord.num_sites, weights_needed=full and srv is None,
        )

    @_guard
    def UploadContext(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first, chunks = self._open(request_iterator, ("header", "meta"))
        self._site(first.header, context)
        if self.mode == "plain":
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, "split-plain needs no context")
        data = self._payload(chunks, MAX_CONTEXT_BYTES)
        with self.lock:
            if self.mode == "full":
                if self.full_context is None:
                    slots, fp = self._run(lambda: self._check_full_context(data))
                    if first.meta.context_fingerprint and fp != first.meta.context_fingerprint:
                        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD,
                                     "the context's fingerprint differs from the announced one")
                    self.full_context, self.full_slots, self.context_fp = data, slots, fp
                    self._write_public_context(data)
                elif first.meta.context_fingerprint != self.context_fp:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH,
                                 "the server already holds another consortium context")
            elif self.server is None:
                srv = self._run(lambda: SplitServer(self.head, self.head_opt, self.head_sched, "he", data,
                                                    self.cfg.train.batch_size, self.recorder))
                fp = _fp_bytes(context_fingerprint(srv.context))
                if first.meta.context_fingerprint and fp != first.meta.context_fingerprint:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD,
                                 "the context's fingerprint differs from the announced one")
                if srv.has_secret_key():  # load_public_context already refuses; belt and braces
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "context holds a secret key")
                n = resolve_workers(self.cfg.split.he_workers)
                if n > 1:  # the server's CKKS processes, holding the public context it was just given
                    srv.workers = self._run(lambda: CKKSWorkers(srv.context, n))
                self.server, self.context_fp = srv, fp
                self._write_public_context(data)
            elif first.meta.context_fingerprint != self.context_fp:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH,
                             "the server already holds another consortium context")
        return pb.UploadContextResponse(header=_resp_header(first.header.sequence), context_fingerprint=self.context_fp,
                                        bytes_received=len(data))

    @_guard
    def GetTurn(self, request: Any, context: grpc.ServicerContext) -> Any:
        site = self._site(request.header, context)
        with self.coord.cond:
            r = self.coord.turn(site, int(request.epoch), int(request.batches_left), int(request.max_wait_ms))
        r.header.CopyFrom(_resp_header(request.header.sequence))
        return r

    @_guard_stream
    def Forward(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        first, chunks = self._open(request_iterator, ("header", "call"))
        site = self._site(first.header, context)
        call = first.call
        self._encoding(call.encoding, self._wire())
        if call.train:
            with self.coord.cond:
                self.coord.require_step(site, call.step)
        payload = self._payload(chunks)
        with self.lock:
            srv = self._need_server()
            if call.train:
                with self.coord.cond:
                    self.coord.require_step(site, call.step)
            t = time.perf_counter()
            layer = self._layer_kw(call.layer)
            reply = self._run(lambda: srv.forward(payload, train=call.train, **layer))
            if call.train:
                self.coord.server_time(time.perf_counter() - t)
                self.bytes_up += len(payload)
                self.bytes_down += len(reply)
        yield from self._reply(pb.ForwardResponse, first.header.sequence, reply)

    @_guard_stream
    def Backward(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        first, chunks = self._open(request_iterator, ("header", "call"))
        site = self._site(first.header, context)
        call = first.call
        self._encoding(call.encoding, self._wire())
        with self.coord.cond:
            self.coord.require_step(site, call.step)
        payload = self._payload(chunks)
        with self.lock:
            srv = self._need_server()
            with self.coord.cond:
                self.coord.require_step(site, call.step)
            t = time.perf_counter()
            refresh = False
            if self.mode == "full":  # enc(lr G) in: enc(W) takes its step; enc(dL/dx) out if the encoder trains
                self._layer_kw(call.layer)
                reply = self._run(lambda: srv.backward(payload, input_grad=call.input_grad)) or b""
                refresh = srv.needs_refresh()  # the step stays open for the holder's refresh
            else:
                reply = self._run(lambda: srv.backward(payload, layer=call.layer))
            self.coord.server_time(time.perf_counter() - t)
            self.bytes_up += len(payload)
            self.bytes_down += len(reply)
            if self.coord.close_on == "backward" and not refresh:
                with self.coord.cond:
                    self.coord.close_step(site)
        yield from self._reply(pb.BackwardResponse, first.header.sequence, reply, refresh_needed=refresh)

    @_guard_stream
    def Predict(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        first, chunks = self._open(request_iterator, ("header", "call"))
        self._site(first.header, context)
        self._not_full("Predict")
        self._encoding(first.call.encoding, pb.PAYLOAD_ENCODING_CKKS_BATCH)
        payload = self._payload(chunks)
        with self.lock:
            srv = self._need_server()
            reply = self._run(lambda: srv.predict(payload))
        yield from self._reply(pb.PredictResponse, first.header.sequence, reply)

    @_guard
    def ApplyUpdate(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first, chunks = self._open(request_iterator, ("header", "call"))
        site = self._site(first.header, context)
        call = first.call
        self._not_full("ApplyUpdate (a plaintext head update)")
        self._encoding(call.encoding, pb.PAYLOAD_ENCODING_TENSOR)
        with self.coord.cond:
            self.coord.require_step(site, call.step)
        payload = self._payload(chunks)
        with self.lock:
            srv = self._need_server()
            with self.coord.cond:
                self.coord.require_step(site, call.step)
            t = time.perf_counter()
            self._run(lambda: srv.apply_update(payload))
            self.coord.server_time(time.perf_counter() - t)
            self.bytes_up += len(payload)
            if self.coord.close_on == "update":
                with self.coord.cond:
                    self.coord.close_step(site)
        return pb.ApplyUpdateResponse(header=_resp_header(first.header.sequence), step=call.step)

    @_guard
    def UploadRelay(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first, chunks = self._open(request_iterator, ("header", "meta"))
        site = self._site(first.header, context)
        meta = first.meta
        with self.coord.cond:
            if not self.coord.relay:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, "this run relays nothing")
            self.coord.require_step(site, meta.step)
            if meta.version != self.coord.relay_version + 1:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                             f"relay version {meta.version}: expected {self.coord.relay_version + 1}")
        blob = self._payload(chunks)
        with self.coord.cond:
            self.coord.require_step(site, meta.step)
            self.coord.relay_blob, self.coord.relay_version = blob, int(meta.version)
            self.coord.close_step(site)
            version = self.coord.relay_version
        return pb.UploadRelayResponse(header=_resp_header(first.header.sequence), version=version)

    @_guard_stream
    def DownloadRelay(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._site(request.header, context)
        with self.coord.cond:
            version, blob = self.coord.relay_version, self.coord.relay_blob
        first = True
        for c in split_payload(blob):
            yield (pb.DownloadRelayResponse(header=_resp_header(request.header.sequence), version=version, chunk=c)
                   if first else pb.DownloadRelayResponse(chunk=c))
            first = False

    @_guard
    def ReportEval(self, request: Any, context: grpc.ServicerContext) -> Any:
        site = self._site(request.header, context)
        with self.coord.cond:
            ev = self.coord.eval
            need = "released" if ev is not None and ev.split == RELEASE and ev.eval_id == request.eval_id else "auroc_macro"
        try:
            metrics = json.loads(request.metrics_json)
            if not isinstance(metrics, dict) or need not in metrics:
                raise ValueError(f"no {need}")
        except ValueError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, f"metrics are not usable: {e}") from None
        with self.coord.cond:
            ok = self.coord.report_eval(site, int(request.eval_id), metrics)
        return pb.ReportEvalResponse(header=_resp_header(request.header.sequence), accepted=ok)

    @_guard
    def EndEpoch(self, request: Any, context: grpc.ServicerContext) -> Any:
        site = self._site(request.header, context)
        with self.coord.cond:
            pending = self.coord.end_epoch(site, int(request.epoch), float(request.loss_sum), int(request.samples),
                                           float(request.epsilon))
        return pb.EndEpochResponse(header=_resp_header(request.header.sequence), epoch=request.epoch,
                                   epoch_closed=pending == 0, sites_pending=pending)

    @_guard
    def UploadWeights(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """split-he-full: the initial enc(W) (builds the head) or a due refresh's re-encryption (closes the step)."""

        first, chunks = self._open(request_iterator, ("header", "meta"))
        site = self._site(first.header, context)
        meta = first.meta
        self._full_only("UploadWeights")
        if meta.purpose == pb.WEIGHTS_PURPOSE_REFRESH:
            with self.coord.cond:
                self.coord.require_step(site, meta.step)
        elif meta.purpose != pb.WEIGHTS_PURPOSE_INITIAL:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD,
                         f"UploadWeights purpose {pb.WeightsPurpose.Name(meta.purpose)}: INITIAL or REFRESH")
        payload = self._payload(chunks)
        with self.lock:
            if meta.purpose == pb.WEIGHTS_PURPOSE_INITIAL:
                if self.server is not None:
                    raise _Abort(grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_OUT_OF_ORDER,
                                 "the server already holds the encrypted head (another hospital uploaded it)")
                if self.full_context is None:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                                 "no public context yet: UploadContext before the initial weights", retry_after_ms=500)
                lin = self.layers[0]
                srv = self._run(lambda: FullSplitServer(self.full_context, lin.in_features, lin.out_features,
                                                        self.cfg.train.batch_size, payload,
                                                        self.cfg.split.full_refresh_every, self.recorder))
                if self.full_pending is not None:  # resumed: the checkpointed enc(W) and counters, as in process
                    self._run(lambda: srv.load_state_dict(self.full_pending))
                    self.full_pending = None
                self.server = srv
            else:
                srv = self._need_server()
                with self.coord.cond:
                    self.coord.require_step(site, meta.step)
                if not srv.needs_refresh():
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                                 f"no refresh is due (the head has taken {srv.head.updates_since_refresh} of "
                                 f"{srv.head.refresh_every} updates since the last)")
                self._run(lambda: srv.replace_weights(payload))
                self.bytes_up += len(payload)
                if self.coord.close_on == "backward":
                    with self.coord.cond:
                        self.coord.close_step(site)
            updates, refreshes = srv.head.updates, srv.head.refreshes
        return pb.UploadWeightsResponse(header=_resp_header(first.header.sequence), updates=updates, refreshes=refreshes)

    @_guard_stream
    def DownloadWeights(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """split-he-full: enc(W) for a due refresh (the step's holder) or a release (the hospital asked to)."""
        site = self._site(request.header, context)
        self._full_only("DownloadWeights")
        with self.lock:
            srv = self._need_server()
            with self.coord.cond:
                if request.purpose == pb.WEIGHTS_PURPOSE_REFRESH:
                    self.coord.require_step(site, request.step)
                    if not srv.needs_refresh():
                        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER, "no refresh is due")
                elif request.purpose == pb.WEIGHTS_PURPOSE_RELEASE:
                    ev = self.coord.eval
                    if (ev is None or ev.split != RELEASE or ev.eval_id != request.eval_id or ev.site != site
                            or ev.result is not None):
                        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                                     f"no release {request.eval_id} is pending for {site_name(site)}")
                else:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD,
                                 f"DownloadWeights purpose {pb.WeightsPurpose.Name(request.purpose)}: REFRESH or RELEASE")
            data = srv.export_weights()
            if request.purpose == pb.WEIGHTS_PURPOSE_REFRESH:
                self.bytes_down += len(data)
            updates = srv.head.updates
        yield from self._reply(pb.DownloadWeightsResponse, request.header.sequence, data, updates=updates)

    def has_secret_key(self) -> bool:
        return bool(self.server is not None and self.server.has_secret_key())


def serve(servicer: SplitServicer, address: str, pki_dir: Any, insecure: bool,
          max_workers: Optional[int] = None) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``servicer`` on ``address`` (mutual TLS + site tokens unless ``insecure``).

    ``pki_dir`` is the server's own folder (``DIR/server`` of ``splitfl certs``), never the whole PKI
    (:func:`splitfl.net.certs.load_server_folder` refuses a folder holding a secret); None only with ``insecure``
    in tests (no tokens at all). ``max_workers`` defaults to 8 + 3 per hospital (as run_split_server sized it): every waiting hospital holds
    a handler thread while it long-polls GetTurn, so with a fixed pool of 16 and more than 15 hospitals the turn
    holder's calls would queue until some poll times out (up to ``poll_ms``, 2 s, per call).
    """
    if max_workers is None:
        max_workers = 8 + 3 * servicer.coord.num_sites

    interceptors = []
    creds = None
    if pki_dir is not None:
        own = load_server_folder(pki_dir, require_tls=not insecure)  # the server's folder; refused if it holds a secret
        interceptors.append(SiteAuthInterceptor(own.tokens, require_peer_cert=not insecure, exempt=STATUS_METHODS))
        if not insecure:
            creds = server_credentials(own)
    else:
        servicer.authenticated = False
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors)
    pbg.add_SplitServiceServicer_to_server(servicer, server)
    port = add_server_port(server, address, creds, insecure=insecure)
    server.start()
    return server, port
