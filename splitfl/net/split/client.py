"""The hospital's side of ``splitfl.v1.SplitService`` on the wire, without torch: :class:`SplitClient`.

Every call a hospital makes (``Hello``, ``UploadContext``, ``GetTurn``, ``Forward``, ``Backward``, ``Predict``,
``ApplyUpdate``, ``UploadRelay`` / ``DownloadRelay``, ``UploadWeights`` / ``DownloadWeights``, ``ReportEval``,
``EndEpoch``, ``Status``) with its header, session, sequence numbers and chunking, on payloads as bytes. The
real hospital (:class:`~splitfl.net.split.hospital.RemoteSplitServer`) is this class plus the SplitServer
interface its transports call; the clinic load benchmark (:mod:`splitfl.bench.clinic_clients`) runs hundreds of
these with replayed ciphertexts. It imports neither torch nor TenSEAL (tests/test_net_split_client.py checks),
so a process holding many of them stays small, and it holds the wire's constants and errors, which
:mod:`~splitfl.net.split.common` re-exports to both sides.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import grpc

from splitfl.net import DEFAULT_CHUNK_SIZE, ERROR_METADATA_KEY, PROTOCOL_VERSION, assemble, open_stream, split_payload
from splitfl.net.certs import read_token
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pbg
from splitfl.net.tls import channel_credentials, make_channel, site_paths

SERVER_VERSION = "splitfl-split/1"
MAX_PAYLOAD_BYTES = 256 << 20  # activations, ciphertexts, relay blobs
# a mode's payload encoding on the wire, as the servicer names modes (plain | he | full)
_WIRE = {"plain": pb.PAYLOAD_ENCODING_TENSOR, "he": pb.PAYLOAD_ENCODING_CKKS_BATCH, "full": pb.PAYLOAD_ENCODING_CKKS_LIST}
_HELLO_MODES = {pb.SPLIT_MODE_HE: "he", pb.SPLIT_MODE_HE_FULL: "he-full"}  # else "plain", as SplitRunner names them


def site_name(index: int) -> str:
    return f"site-{index}"


class RemoteError(ValueError):
    """A call the server refused: ``code`` (grpc.StatusCode), ``error_code`` (splitfl.v1.ErrorCode), ``detail``.

    A ValueError, as :class:`splitfl.tensors.ProtocolError` is, without importing torch to subclass it.
    """

    def __init__(self, code: Any, error_code: int, message: str, detail: Optional[Any] = None) -> None:
        super().__init__(message)
        self.code, self.error_code, self.detail = code, error_code, detail


def _remote_error(e: grpc.RpcError) -> RemoteError:
    detail = None
    for k, v in (e.trailing_metadata() or ()):
        if k == ERROR_METADATA_KEY:
            detail = pb.ErrorDetail.FromString(v)
    code = e.code()
    ecode = detail.code if detail is not None else pb.ERROR_CODE_UNSPECIFIED
    name = pb.ErrorCode.Name(ecode) if ecode else "no detail"
    return RemoteError(code, ecode, f"server refused the call: {code.name} ({name}): {e.details()}", detail)


def site_channel(server: str, site: int, pki_dir: Any, insecure: bool, options: tuple = ()) -> grpc.Channel:
    """Hospital ``site``'s channel: mutual TLS with its certificate and its token on every call.

    ``pki_dir``: the PKI root (with manifest.json) or the site's own folder; None only with ``insecure``.
    ``options``: gRPC channel options (the load benchmark gives each hospital its own connection).
    """
    if pki_dir is None:
        return make_channel(server, insecure=insecure, options=options)
    sp = site_paths(pki_dir, site_name(site)) if (Path(pki_dir) / "manifest.json").exists() else site_paths(pki_dir)
    if sp.site != site_name(site):
        raise ValueError(f"{pki_dir} holds the credentials of {sp.site}, not {site_name(site)}")
    creds = None if insecure else channel_credentials(sp.ca_cert, sp.cert, sp.key)
    return make_channel(server, creds, insecure=insecure, options=options, site=sp.site, token=read_token(sp.token))


class SplitClient:
    """One hospital's session with the split server: the RPCs, payloads as bytes (see the module's docstring)."""

    def __init__(self, channel: grpc.Channel, site: int, run_id: str, fingerprint: bytes, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, timeout_s: float = 600.0) -> None:
        self.stub = pbg.SplitServiceStub(channel)
        self.channel = channel
        self.site, self.run_id, self.fp = site, run_id, fingerprint
        self.chunk_size, self.timeout = chunk_size, timeout_s
        self._seq = 0
        self._lock = threading.Lock()
        self.session = b""
        self.step = 0
        self._part: dict[tuple[str, int], int] = {}
        self.mode = "plain"  # plain | he | he-full, as SplitRunner names them
        self.hello: Any = None
        self.layers: list[Any] = []  # the head's layers as Hello describes them (in_features, out_features)
        self._refresh_needed = False  # split-he-full: what the step's Backward said

    # ---------------------------------------------------------------- plumbing

    def _header(self, hello: bool = False) -> Any:
        with self._lock:
            if not hello:
                self._seq += 1
            return pb.RequestHeader(protocol_version=PROTOCOL_VERSION, run_id=self.run_id, config_fingerprint=self.fp,
                                    site_id=self.site, session_id=b"" if hello else self.session,
                                    sequence=0 if hello else self._seq)

    def _requests(self, cls: Any, payload: bytes, **first: Any) -> Iterator[Any]:
        it = split_payload(payload, self.chunk_size)
        yield cls(header=self._header(), chunk=next(it), **first)
        for c in it:
            yield cls(chunk=c)

    def _call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, timeout=self.timeout, **kwargs)
        except grpc.RpcError as e:
            raise _remote_error(e) from None

    def _bidi_first(self, method: Any, cls: Any, payload: bytes, **first: Any) -> tuple[Any, bytes]:
        """A streamed call: the response's first message (its header and parameters) and its payload."""
        return self._download(lambda: method(self._requests(cls, payload, **first), timeout=self.timeout))

    def _bidi(self, method: Any, cls: Any, payload: bytes, **first: Any) -> bytes:
        return self._bidi_first(method, cls, payload, **first)[1]

    @staticmethod
    def _download(start: Callable[[], Iterator[Any]]) -> tuple[Any, bytes]:
        try:
            head, chunks = open_stream(start(), ("header",))
            return head, assemble(chunks, MAX_PAYLOAD_BYTES)
        except grpc.RpcError as e:
            raise _remote_error(e) from None

    def _part_of(self, kind: str, layer: int) -> int:
        key = (kind, layer)
        self._part[key] = self._part.get(key, -1) + 1
        return self._part[key]

    def begin_step(self, step: int) -> None:
        self.step, self._part = step, {}

    def _wire(self) -> int:
        return _WIRE[{"he-full": "full"}.get(self.mode, self.mode)]

    # ---------------------------------------------------------------- session and coordination

    def connect(self, feature_dim: int = 0, context_fingerprint: bytes = b"") -> Any:
        """Hello: a new session (sequence numbers restart); the server's mode and head layers."""
        r = self._call(self.stub.Hello, pb.SplitHelloRequest(
            header=self._header(hello=True), client_nonce=os.urandom(16), context_fingerprint=context_fingerprint,
            feature_dim=feature_dim, client_version=SERVER_VERSION))
        with self._lock:
            self.session, self._seq = bytes(r.session.session_id), 0
        self.hello = r
        self.mode = _HELLO_MODES.get(r.mode, "plain")
        self.layers = list(r.layers)
        return r

    def upload_context(self, data: bytes, fingerprint: bytes, galois: bool = False, relin: bool = False) -> Any:
        meta = pb.ContextMeta(context_fingerprint=fingerprint, galois_keys=galois, relin_keys=relin)
        return self._call(self.stub.UploadContext, self._requests(pb.UploadContextRequest, data, meta=meta))

    def status(self) -> Any:
        return self._call(self.stub.Status, pb.StatusRequest(header=pb.RequestHeader(protocol_version=PROTOCOL_VERSION)))

    def get_turn(self, epoch: int, batches_left: int, max_wait_ms: int = 2000) -> Any:
        return self._call(self.stub.GetTurn, pb.GetTurnRequest(header=self._header(), epoch=epoch,
                                                               batches_left=batches_left, max_wait_ms=max_wait_ms))

    def end_epoch_remote(self, epoch: int, loss_sum: float, samples: int, epsilon: float = 0.0) -> Any:
        return self._call(self.stub.EndEpoch, pb.EndEpochRequest(header=self._header(), epoch=epoch, loss_sum=loss_sum,
                                                                 samples=samples, epsilon=epsilon))

    def upload_relay(self, step: int, version: int, blob: bytes) -> Any:
        meta = pb.RelayMeta(step=step, version=version)
        return self._call(self.stub.UploadRelay, self._requests(pb.UploadRelayRequest, blob, meta=meta))

    def download_relay(self) -> tuple[int, bytes]:
        first, blob = self._download(lambda: self.stub.DownloadRelay(pb.DownloadRelayRequest(header=self._header()),
                                                                     timeout=self.timeout))
        return int(first.version), blob

    def upload_weights(self, payload: bytes, purpose: int, step: int = 0) -> Any:
        """split-he-full: enc(W) up (INITIAL, or REFRESH of the open ``step``)."""
        meta = pb.WeightsMeta(purpose=purpose, step=step)
        return self._call(self.stub.UploadWeights, self._requests(pb.UploadWeightsRequest, payload, meta=meta))

    def download_weights(self, purpose: int, step: int = 0, eval_id: int = 0) -> bytes:
        """split-he-full: enc(W) down (REFRESH of the open ``step``, or RELEASE ``eval_id``)."""
        req = pb.DownloadWeightsRequest(header=self._header(), purpose=purpose, step=step, eval_id=eval_id)
        return self._download(lambda: self.stub.DownloadWeights(req, timeout=self.timeout))[1]

    def report_eval(self, eval_id: int, metrics: dict) -> Any:
        return self._call(self.stub.ReportEval, pb.ReportEvalRequest(header=self._header(), eval_id=eval_id,
                                                                     metrics_json=json.dumps(metrics)))

    # ---------------------------------------------------------------- the head's calls

    def forward(self, payload: bytes, train: bool = True, layer: int = 0) -> bytes:
        call = pb.ForwardCall(step=self.step if train else 0, part=self._part_of("f", layer) if train else 0,
                              layer=layer, train=train, encoding=self._wire())
        return self._bidi(self.stub.Forward, pb.ForwardRequest, payload, call=call)

    def backward(self, payload: bytes, layer: Optional[int] = None, *, input_grad: bool = True) -> Optional[bytes]:
        """The output gradient up, the input gradient back; split-he-full: None unless ``input_grad``."""
        layer = len(self.layers) - 1 if layer is None else layer
        call = pb.BackwardCall(step=self.step, part=self._part_of("b", layer), layer=layer, encoding=self._wire(),
                               input_grad=input_grad)
        first, reply = self._bidi_first(self.stub.Backward, pb.BackwardRequest, payload, call=call)
        self._refresh_needed = bool(first.refresh_needed)
        return None if self.mode == "he-full" and not input_grad else reply

    def predict(self, payload: bytes) -> bytes:
        call = pb.PredictCall(part=0, encoding=pb.PAYLOAD_ENCODING_CKKS_BATCH)
        return self._bidi(self.stub.Predict, pb.PredictRequest, payload, call=call)

    def apply_update(self, payload: bytes) -> None:
        call = pb.ApplyUpdateCall(step=self.step, encoding=pb.PAYLOAD_ENCODING_TENSOR)
        self._call(self.stub.ApplyUpdate, self._requests(pb.ApplyUpdateRequest, payload, call=call))
