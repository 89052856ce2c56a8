"""split-plain / split-he / split-he-full with the server (head) and the hospitals (encoders, data, labels, keys) in separate processes.

Architecture
------------
* :class:`SplitServicer` serves ``splitfl.v1.SplitService`` around a real
  :class:`~splitfl.split.server.SplitServer` (head, optimizer, scheduler, and in
  split-he only the consortium's PUBLIC context, uploaded by a hospital). Every
  call is checked in the protocol's order (token + client certificate by
  :class:`~splitfl.net.tls.SiteAuthInterceptor`, then version, run id + config
  fingerprint, site, session, sequence) before any payload is read; payloads
  are chunk streams (:mod:`splitfl.net.chunks`).
* :class:`Coordinator` hands out training steps in exactly the in-process
  order (:meth:`SplitRunner.train_epoch`: round-robin over hospitals, skipping
  those without batches left) through ``GetTurn``. A hospital silent past
  ``turn_timeout_s`` is skipped for the rest of the epoch; training goes on.
* Shared-encoder relay (sequential split learning): after its step the
  hospital uploads the hospitals' shared state (encoder, its optimizer and
  scheduler, DP accountants and noise generator) sealed with AES-256-GCM under
  a key derived with HKDF-SHA256 from the consortium secret (split-he:
  ``keys/consortium.secret``; split-plain: ``keys/relay.secret``), which the
  server never holds. The server stores the opaque blob and hands it to the
  next hospital (``UploadRelay`` / ``DownloadRelay``); the relay version is in
  the blob's associated data. With a frozen encoder and no DP noise nothing is
  relayed (the hospitals' shared state never changes).
* :class:`RemoteSplitServer` is the hospital's stub with the methods the
  transports call (``forward``, ``backward``, ``predict``, ``apply_update``,
  ``end_epoch``, ``layers``, ``he``, ``he_mlp``): a :class:`SplitRunner` built
  with ``server_factory=client.bind`` runs the very same hospital code as in
  process.
* The server runs :func:`splitfl.engine.fit` with :class:`RemoteServerRunner`:
  ``train_epoch`` coordinates one remote epoch, ``evaluate`` asks one live
  hospital (``TURN_STATE_EVALUATE``) to evaluate the split through the head
  and report the metrics (``ReportEval``), checkpoints hold the head, its
  optimizer and the sealed relay blob, so the usual atomic checkpoints and
  resume work (hospitals are stateless between steps). ``best_model.pt``
  holds the head (``head.*``) and the sealed hospital state (``_relay.*``).
* DP (split-he with ``split.dp_noise_multiplier > 0``): the accountants
  travel in the sealed relay, so each hospital reports its own spent epsilon
  with ``EndEpoch`` (``EndEpochRequest.epsilon``); the server's history and
  ``metrics.json`` carry the same ``epsilon`` / ``privacy`` as in process.

* split-he-full (:mod:`splitfl.he.encrypted_head`): the server's head is
  ``enc(W)``, a :class:`~splitfl.split.full_server.FullSplitServer` built once
  it holds the consortium's PUBLIC context (``UploadContext``: relinearisation
  and batch-sum Galois keys, ``full_public_context_bytes``) and the initial
  ``enc(W)``, which the first hospital whose ``Hello`` says ``weights_needed``
  encrypts and uploads (``UploadWeights`` INITIAL); before that every training
  or evaluation call is refused. ``Forward`` / ``Backward`` carry exactly the
  in-process ``FullHETransport`` messages (``SFCT`` ciphertext lists:
  ``enc(x)``, ``enc(partial logits)``, ``enc(lr G)``, ``enc(dL/dx)``); when the
  head's update budget is spent ``Backward`` says ``refresh_needed`` and the
  step stays open until its holder downloads ``enc(W)``, decrypts,
  re-encrypts and uploads it (``DownloadWeights`` / ``UploadWeights``
  REFRESH; the server counts it). When the validation score improves the
  server asks one hospital to release the head (``TURN_STATE_RELEASE``): it
  downloads ``enc(W)``, decrypts it and writes the released plaintext model,
  ``<hospital out>/best_model.pt`` (encoder + head, as ``splitfl train``
  writes it). Who writes what: the server writes ``checkpoint.pt`` (``enc(W)``
  and its update/refresh counters, the sealed relay), ``best_model.pt``
  (the sealed relay and the best epoch's ``enc(W)``: never a plaintext head),
  the metrics and the transcript; only hospitals write plaintext weights. As
  in process, the test split is evaluated through the best epoch's head: the
  server puts that ``enc(W)`` back before the test.

Entry points: :func:`run_split_server` and :func:`run_split_site`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import threading
import time
import warnings
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import grpc
import torch

from splitfl.artifacts import save_checkpoint, write_bytes, write_csv, write_json
from splitfl.data import load_splits
from splitfl.engine import (
    BEST_MODEL,
    RunError,
    best_model_payload,
    fit,
    make_fabric,
    make_optimizer,
    make_scheduler,
    write_run_metrics,
)
from splitfl.he import HEError
from splitfl.he.encrypted_head import FullHeadLayout
from splitfl.he.keys import consortium_secret_context, context_fingerprint, engine_for, load_public_context, params_of
from splitfl.models import build_split_model
from splitfl.net import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_REPLAY_WINDOW,
    ERROR_METADATA_KEY,
    PROTOCOL_VERSION,
    STATUS_METHODS,
    SUPPORTED_VERSIONS,
    ChunkError,
    assemble,
    max_sequence_jump,
    open_stream,
    split_payload,
)
from splitfl.net.certs import load_server_folder, read_token
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pbg
from splitfl.net.tls import (
    SiteAuthInterceptor,
    add_server_port,
    authenticated_site,
    channel_credentials,
    make_channel,
    server_credentials,
    site_paths,
)
from splitfl.plots import plot_learning_curves
from splitfl.split.full_server import FullSplitServer
from splitfl.split.runner import SplitRunner, check_split_cut, full_layout, full_preset, privacy_summary, wire_summary
from splitfl.split.server import SplitServer
from splitfl.tensors import ProtocolError
from splitfl.transcript import TranscriptRecorder

__all__ = [
    "Coordinator",
    "RelaySealer",
    "RemoteError",
    "RemoteServerRunner",
    "RemoteSplitServer",
    "SplitServicer",
    "config_fingerprint",
    "ensure_consortium_keys",
    "run_split_server",
    "run_split_site",
    "site_name",
]

SERVER_VERSION = "splitfl-split/1"
MAX_PAYLOAD_BYTES = 256 << 20  # activations, ciphertexts, relay blobs
MAX_CONTEXT_BYTES = 1 << 30  # public contexts with Galois keys
RELAY_KEY_FILE = "relay.secret"
REGIMES = ("split-plain", "split-he", "split-he-full")
HE_REGIMES = ("split-he", "split-he-full")  # the hospitals hold the consortium's CKKS secret key
_BUILD_LOCK = threading.Lock()  # seeding + model construction use torch's global RNG: one party at a time per process


def site_name(index: int) -> str:
    return f"site-{index}"


def config_fingerprint(cfg: Any) -> bytes:
    """SHA-256 of the protocol-relevant configuration, the same on the server and every hospital."""
    d = dataclasses.asdict(cfg)
    d.pop("fed", None)
    d["data"].pop("root", None)
    d["data"].pop("manifest", None)
    for k in ("progress", "eval_batch_size", "accelerator", "devices", "precision"):
        d["train"].pop(k, None)
    for k in ("transcript", "transcript_max_steps", "cache_embeddings"):
        d["split"].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).digest()


def _fp_bytes(fingerprint: str) -> bytes:
    """splitfl.he.context_fingerprint ("sha256:<hex>") as the 32 bytes the protocol carries."""
    text = fingerprint.split(":", 1)[-1]
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    return raw if len(raw) == 32 else hashlib.sha256(fingerprint.encode()).digest()


def relay_needed(cfg: Any) -> bool:
    """The hospitals' shared state changes during training: a trainable encoder, or DP noise drawn in turn."""
    return (not cfg.model.freeze_encoder) or (cfg.regime == "split-he" and cfg.split.dp_noise_multiplier > 0)


# ============================================================================ errors


class RemoteError(ProtocolError):
    """A call the server refused: ``code`` (grpc.StatusCode), ``error_code`` (splitfl.v1.ErrorCode), ``detail``."""

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


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, ecode: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.ecode, self.extra = code, ecode, extra


def _abort(context: grpc.ServicerContext, a: _Abort) -> None:
    detail = pb.ErrorDetail(code=a.ecode, message=str(a), **a.extra)
    context.set_trailing_metadata(((ERROR_METADATA_KEY, detail.SerializeToString()),))
    context.abort(a.code, f"splitfl: {a}")


def _resp_header(seq: int) -> Any:
    return pb.ResponseHeader(protocol_version=PROTOCOL_VERSION, sequence=seq, server_time_unix_ms=int(time.time() * 1000))


# ============================================================================ relay sealing


class RelaySealer:
    """AES-256-GCM under HKDF-SHA256(consortium secret); associated data binds run, config and relay version."""

    def __init__(self, secret: bytes, run_id: str, fingerprint: bytes) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if len(secret) < 32:
            raise ValueError("the relay key material must hold at least 32 bytes")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"splitfl-relay-v1",
                   info=b"splitfl shared-encoder relay|" + run_id.encode() + b"|" + fingerprint).derive(secret)
        self._aead = AESGCM(key)
        self._prefix = run_id.encode() + b"|" + fingerprint

    def _aad(self, version: int) -> bytes:
        return self._prefix + b"|" + str(int(version)).encode()

    def seal(self, data: bytes, version: int) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, self._aad(version))

    def open(self, blob: bytes, version: int) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(blob) < 28:
            raise ProtocolError("relay blob too short")
        try:
            return self._aead.decrypt(blob[:12], blob[12:], self._aad(version))
        except InvalidTag:
            raise ProtocolError(f"relay blob of version {version} does not open under the consortium key "
                                "(tampered, replayed, or another consortium's)") from None


def relay_key_material(keys_dir: Path, he: bool) -> bytes:
    """split-he: the consortium secret file; split-plain: ``keys/relay.secret`` (made once, shared by the hospitals)."""

    if he:
        return (keys_dir / "consortium.secret").read_bytes()
    path = keys_dir / RELAY_KEY_FILE
    if not path.exists():
        write_bytes(path, os.urandom(32), 0o600)
    return path.read_bytes()


def ensure_consortium_keys(cfg: Any, keys_dir: Any) -> Path:
    """Make the hospitals' shared key file once, before the hospitals start (launchers call this, then copy or share it).

    split-he / split-he-full: ``consortium.secret`` (the CKKS secret context, of the ``full`` preset in
    split-he-full; its key material also seals the relay); split-plain: ``relay.secret`` (32 random bytes),
    needed only when something is relayed. Never give either file to the server. Returns the folder.
    """
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True)
    if cfg.regime in HE_REGIMES:
        preset = full_preset(cfg) if cfg.regime == "split-he-full" else cfg.split.he_preset
        consortium_secret_context(keys_dir / "consortium.secret", preset, "split.he_preset")
    elif relay_needed(cfg):
        relay_key_material(keys_dir, False)
    return keys_dir


# ============================================================================ server: sessions and turns


class _Sessions:
    def __init__(self, window: int = DEFAULT_REPLAY_WINDOW) -> None:
        self.window = window
        self.lock = threading.Lock()
        self.sessions: dict[int, bytes] = {}
        self.seen: dict[int, set[int]] = {}
        self.highest: dict[int, int] = {}
        self.nonces: set[bytes] = set()

    def open(self, site: int, nonce: bytes) -> bytes:
        with self.lock:
            if len(nonce) != 16:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "client_nonce must be 16 bytes")
            if nonce in self.nonces:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED, "Hello nonce seen before in this run")
            self.nonces.add(nonce)
            sid = os.urandom(16)
            self.sessions[site], self.seen[site], self.highest[site] = sid, set(), 0
            return sid

    def check(self, site: int, session: bytes, seq: int) -> None:
        with self.lock:
            if site not in self.sessions or session != self.sessions[site]:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_UNKNOWN_SESSION,
                             "unknown or replaced session: say Hello again")
            hi = self.highest[site]
            if seq < 1 or seq in self.seen[site] or seq <= hi - self.window:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED,
                             f"sequence {seq} already used or outside the replay window", highest_sequence=hi)

            jump = max_sequence_jump(self.window)
            if seq > hi + jump:  # would move the window past every genuine request still to come
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED,
                             f"sequence {seq} jumps more than {jump} ahead of the session's highest ({hi}); number "
                             "requests 1, 2, 3, ... within a session (or say Hello again for a new one)",
                             highest_sequence=hi)
            self.seen[site].add(seq)
            self.highest[site] = max(hi, seq)
            self.seen[site] = {s for s in self.seen[site] if s > self.highest[site] - self.window}


RELEASE = "release"  # the Coordinator's request kind for a split-he-full release (next to "val" / "test")


@dataclasses.dataclass
class _Eval:
    eval_id: int
    split: str
    site: int
    asked: float
    result: Optional[dict] = None
    info: dict = dataclasses.field(default_factory=dict)  # a release's epoch and validation AUROC


class Coordinator:
    """Turn-taking, the epoch barrier, evaluation requests and the sealed relay blob (all under one condition)."""

    def __init__(self, num_sites: int, relay: bool, close_on: str, *, turn_timeout_s: float = 300.0,
                 join_timeout_s: float = 600.0, eval_timeout_s: float = 600.0) -> None:
        self.num_sites, self.relay, self.close_on = num_sites, relay, close_on
        self.turn_timeout_s, self.join_timeout_s, self.eval_timeout_s = turn_timeout_s, join_timeout_s, eval_timeout_s
        self.cond = threading.Condition()
        self.phase = "starting"  # train | between | done
        self.epoch = 0
        self.counts: dict[int, int] = {}
        self.skipped: set[int] = set()
        self.ended: dict[int, tuple[float, int]] = {}
        self.open_step: Optional[tuple[int, int]] = None  # (step id, site)
        self.next_step = 1
        self.last_site = -1
        self.last_seen: dict[int, float] = {}
        self.eval: Optional[_Eval] = None
        self.next_eval = 1
        self.relay_version = 0
        self.relay_blob = b""
        self.done_seen: set[int] = set()
        self.epsilons: dict[int, float] = {}  # split-he DP: each hospital's spent epsilon, reported at EndEpoch
        self.log: list[tuple[int, int]] = []  # (epoch, site) of every granted step, for tests and logs
        # Per-step timings (the server's view, unix seconds): granted, closed (None: still open or timed out),
        # outcome, server_s (the head's compute in the step); run_split_server writes them to <out>/steps.csv
        # (read by bench/split_load.py).
        self.step_times: list[dict[str, Any]] = []
        # Every hospital has come to an epoch of this process: until then a missing one stops the run (it never
        # joined: a wrong address, credentials, or a join timeout shorter than its start-up); after, one that
        # goes silent is skipped for the epoch and training goes on.
        self.all_joined = False

    # ---------------------------------------------------------------- called by handlers (under self.cond)

    def seen(self, site: int) -> None:
        self.last_seen[site] = time.monotonic()

    def require_step(self, site: int, step: int) -> None:
        if self.open_step is None or self.open_step != (step, site):
            holder = f"step {self.open_step[0]} held by {site_name(self.open_step[1])}" if self.open_step else "no open step"
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         f"{site_name(site)} does not hold step {step} ({holder})", retry_after_ms=200)

    def close_step(self, site: int) -> None:
        self.counts[site] = max(0, self.counts.get(site, 0) - 1)
        self._time_step("closed")
        self.open_step = None
        self.cond.notify_all()

    def turn(self, site: int, epoch: int, batches_left: int, max_wait_ms: int) -> Any:
        deadline = time.monotonic() + min(max_wait_ms, 30_000) / 1000
        while True:
            self.seen(site)
            r = self._turn_once(site, epoch, batches_left)
            if r is not None or time.monotonic() >= deadline:
                return r or pb.GetTurnResponse(state=pb.TURN_STATE_WAIT, epoch=self.epoch, retry_after_ms=200,
                                               relay_version=self.relay_version)
            self.cond.wait(max(0.0, min(0.5, deadline - time.monotonic())))

    def _turn_once(self, site: int, epoch: int, batches_left: int) -> Any:
        base = {"epoch": self.epoch, "relay_version": self.relay_version}
        if self.phase == "done":
            self.done_seen.add(site)
            self.cond.notify_all()
            return pb.GetTurnResponse(state=pb.TURN_STATE_RUN_DONE, **base)
        ev = self.eval
        if ev is not None and ev.result is None and ev.site == site:
            if ev.split == RELEASE:
                return pb.GetTurnResponse(state=pb.TURN_STATE_RELEASE, eval_id=ev.eval_id, **ev.info, **base)
            return pb.GetTurnResponse(state=pb.TURN_STATE_EVALUATE, eval_split=ev.split, eval_id=ev.eval_id, **base)
        if self.phase == "train" and epoch < self.epoch:  # the site is behind: tell it the epoch at once
            return pb.GetTurnResponse(state=pb.TURN_STATE_WAIT, retry_after_ms=0, **base)
        if self.phase != "train" or epoch != self.epoch or site in self.ended:
            return None
        if site not in self.counts and site not in self.skipped:
            self.counts[site] = int(batches_left)
            self.cond.notify_all()
        if self.open_step is not None and self.open_step[1] == site:
            return pb.GetTurnResponse(state=pb.TURN_STATE_YOURS, step=self.open_step[0], **base)
        if site in self.skipped or self.counts.get(site, 0) == 0:
            return pb.GetTurnResponse(state=pb.TURN_STATE_EPOCH_DONE, **base)
        return None

    def end_epoch(self, site: int, epoch: int, loss_sum: float, samples: int, epsilon: float = 0.0) -> Any:
        if self.phase != "train" or epoch != self.epoch or site in self.ended:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         f"epoch {epoch} is not open for {site_name(site)} (server epoch {self.epoch}, {self.phase})")
        if site not in self.skipped and self.counts.get(site, 1) > 0:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         f"{site_name(site)} still has {self.counts.get(site)} step(s) in epoch {epoch}")
        if not (math.isfinite(loss_sum) and samples >= 0):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "loss_sum must be finite")
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "epsilon must be finite and >= 0")
        self.ended[site] = (float(loss_sum), int(samples)) if site not in self.skipped else (0.0, 0)
        self.epsilons[site] = max(self.epsilons.get(site, 0.0), float(epsilon))  # spent privacy never shrinks
        self.cond.notify_all()
        pending = [s for s in self.counts if s not in self.ended and s not in self.skipped]
        return len(pending)

    # ---------------------------------------------------------------- called by the server's runner

    def server_time(self, seconds: float) -> None:
        """The head's compute in the open step (forward / backward / update), for steps.csv's server_s."""
        with self.cond:
            if self.step_times and self.step_times[-1]["outcome"] == "open":
                self.step_times[-1]["server_s"] += seconds

    def _time_step(self, outcome: str) -> None:
        if self.step_times and self.step_times[-1]["outcome"] == "open":
            self.step_times[-1].update(closed=time.time(), outcome=outcome)

    def _stale(self, site: int, timeout: float) -> bool:
        return time.monotonic() - self.last_seen.get(site, 0.0) > timeout

    def run_epoch(self, epoch: int) -> tuple[float, int, list[int]]:
        """Coordinate one training epoch; returns (loss sum, samples, skipped sites).

        Raises RunError, before anything is trained or recorded, when a hospital never joined this server (the
        first epoch it runs waits ``join_timeout_s`` for all of them) or when no hospital came to the epoch at
        all, and after it when the epoch trained no sample: an empty epoch is never handed to the checkpoint.
        """
        with self.cond:
            self.phase, self.epoch = "train", epoch
            self.counts, self.skipped, self.ended = {}, set(), {}
            self.open_step, self.last_site = None, -1
            self.cond.notify_all()
            started = time.monotonic()
            deadline = started + self.join_timeout_s
            while len(self.counts) < self.num_sites and time.monotonic() < deadline:
                self.cond.wait(0.2)
            missing = sorted(set(range(self.num_sites)) - set(self.counts))
            if missing and (not self.all_joined or len(missing) == self.num_sites):
                self._stop_epoch()
                names = ", ".join(site_name(s) for s in missing)
                came = ", ".join(site_name(s) for s in sorted(self.counts)) or "none"
                what = "never joined" if not self.all_joined else "did not come back"
                raise RunError(
                    f"hospital(s) {names} {what}: waited {time.monotonic() - started:.0f} s (join timeout "
                    f"{self.join_timeout_s:g} s) for all {self.num_sites} hospitals before epoch {epoch + 1}; "
                    f"came: {came}. Nothing was trained or recorded for epoch {epoch + 1}. Start the missing "
                    "hospitals (`splitfl join --site N ...`, same config, this server's address) and rerun with "
                    "the same --out, or give them longer to start with --join-timeout (join_timeout_s)")
            self.all_joined = True
            self.skipped |= set(missing)
            while True:
                if self.open_step is None:
                    nxt = self._next_site()
                    if nxt is None:
                        break
                    self.open_step = (self.next_step, nxt)
                    self.next_step += 1
                    self.last_site = nxt
                    self.log.append((epoch, nxt))
                    self.step_times.append({"epoch": epoch, "step": self.open_step[0], "site": nxt,
                                            "granted": time.time(), "closed": None, "outcome": "open", "server_s": 0.0})
                    self.last_seen.setdefault(nxt, time.monotonic())
                    self.cond.notify_all()
                else:
                    holder = self.open_step[1]
                    if self._stale(holder, self.turn_timeout_s):
                        self.skipped.add(holder)  # gone: the rest of the epoch goes on without it
                        self._time_step("timeout")
                        self.open_step = None
                        continue
                    self.cond.wait(0.2)
            while True:
                pending = [s for s in self.counts if s not in self.ended and s not in self.skipped]
                if not pending:
                    break
                for s in pending:
                    if self._stale(s, self.turn_timeout_s):
                        self.skipped.add(s)
                self.cond.wait(0.2)
            self.phase = "between"
            self.cond.notify_all()
            loss = sum(v[0] for v in self.ended.values())
            samples = sum(v[1] for v in self.ended.values())
            if samples == 0:
                gone = ", ".join(site_name(s) for s in sorted(self.skipped)) or "none"
                raise RunError(
                    f"epoch {epoch + 1} trained no sample: no hospital finished its steps (skipped as silent for "
                    f"{self.turn_timeout_s:g} s: {gone}); refusing to record an empty epoch. Check the hospitals' "
                    "logs, restart them and rerun the server with the same --out to resume from the last checkpoint")
            return loss, samples, sorted(self.skipped)

    def _stop_epoch(self) -> None:
        """Close an epoch that will not run (under self.cond): no turn is granted, hospitals wait."""
        self.phase = "between"
        self.open_step = None
        self.cond.notify_all()

    def _next_site(self) -> Optional[int]:
        for k in range(1, self.num_sites + 1):
            s = (self.last_site + k) % self.num_sites
            if s not in self.skipped and self.counts.get(s, 0) > 0:
                return s
        return None

    def evaluate(self, split: str, **info: Any) -> dict:
        """Ask one live hospital to evaluate ``split`` ("val", "test") or, split-he-full, to release the head
        (``split`` = :data:`RELEASE`, ``info`` the GetTurnResponse release fields); its ReportEval answer."""
        with self.cond:
            tried: set[int] = set()
            while True:
                live = [s for s in range(self.num_sites)
                        if s not in tried and not self._stale(s, self.turn_timeout_s)] or \
                       [s for s in range(self.num_sites) if s not in tried]
                if not live:
                    raise RuntimeError(f"no hospital evaluated the {split} split")
                ev = _Eval(self.next_eval, split, live[0], time.monotonic(), info=info)
                self.next_eval += 1
                self.eval = ev
                self.cond.notify_all()
                while ev.result is None and time.monotonic() - ev.asked < self.eval_timeout_s:
                    self.cond.wait(0.2)
                self.eval = None
                if ev.result is not None:
                    return ev.result
                tried.add(ev.site)

    def report_eval(self, site: int, eval_id: int, metrics: dict) -> bool:
        ev = self.eval
        if ev is None or ev.eval_id != eval_id or ev.site != site or ev.result is not None:
            return False
        ev.result = metrics
        self.cond.notify_all()
        return True

    def finish(self, grace_s: float) -> None:
        with self.cond:
            self.phase = "done"
            self.cond.notify_all()
            deadline = time.monotonic() + grace_s
            while len(self.done_seen) < self.num_sites and time.monotonic() < deadline:
                self.cond.wait(0.2)


# ============================================================================ server: the gRPC service


_MODES = {"split-plain": "plain", "split-he": "he", "split-he-full": "full"}
_PB_MODES = {"plain": pb.SPLIT_MODE_PLAIN, "he": pb.SPLIT_MODE_HE, "full": pb.SPLIT_MODE_HE_FULL}
_WIRE = {"plain": pb.PAYLOAD_ENCODING_TENSOR, "he": pb.PAYLOAD_ENCODING_CKKS_BATCH, "full": pb.PAYLOAD_ENCODING_CKKS_LIST}


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
        layout = FullHeadLayout(lin.in_features, lin.out_features, self.cfg.train.batch_size, eng.slots)
        if eng.levels < 2:
            raise HEError(f"the context has {eng.levels} rescaling level(s); split-he-full needs two (preset full)")
        if not ctx.has_relin_keys() or (layout.rotation_steps() and not ctx.has_galois_keys()):
            raise HEError("split-he-full needs relinearisation and batch-sum Galois keys in the public context "
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


# ============================================================================ server: the runner for fit()


class RemoteServerRunner:
    """``splitfl.engine.fit``'s runner on the server: epochs and evaluations happen at the hospitals."""

    def __init__(self, cfg: Any, splits: Any, servicer: SplitServicer, coordinator: Coordinator) -> None:
        self.cfg, self.splits, self.svc, self.coord = cfg, splits, servicer, coordinator
        self.train_set = splits.train
        self.train_bytes_up = self.train_bytes_down = self.train_samples = self.epochs_done = 0
        self.dp = cfg.regime == "split-he" and cfg.split.dp_noise_multiplier > 0
        self.full = cfg.regime == "split-he-full"
        self._extras: dict[str, Any] = {}
        self._last_val: dict[str, Any] = {}  # the latest validation metrics (a release records its AUROC)

    def train_epoch(self, epoch: int, desc: str) -> float:
        up0, down0 = self.svc.bytes_up, self.svc.bytes_down
        loss, samples, skipped = self.coord.run_epoch(epoch)
        if self.svc.head_sched is not None:
            self.svc.head_sched.step()  # SplitServer.end_epoch
        up, down = self.svc.bytes_up - up0, self.svc.bytes_down - down0
        self.train_bytes_up += up
        self.train_bytes_down += down
        self.train_samples += samples
        self.epochs_done += 1
        self._extras = {"bytes_up": up, "bytes_down": down, "sites_skipped": len(skipped)}
        if self.dp:
            self._extras["epsilon"] = max(self.epsilon_per_site())
        return loss / max(samples, 1)

    def epsilon_per_site(self) -> list[float]:
        """Each hospital's spent epsilon as it last reported it (0 for one that never did)."""
        with self.coord.cond:
            return [self.coord.epsilons.get(s, 0.0) for s in range(self.coord.num_sites)]

    def evaluate(self, dataset: Any) -> dict[str, Any]:
        split = "val" if dataset is self.splits.val else "test" if dataset is self.splits.test else None
        if split is None:
            raise ValueError("the remote runner evaluates only the validation and test splits")
        result = self.coord.evaluate(split)
        if split == "val":
            self._last_val = result
        return result

    def lr(self) -> float:
        return self.svc.head_opt.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        with self.coord.cond:
            relay = (self.coord.relay_version, self.coord.relay_blob, self.coord.next_step)
            epsilons = dict(self.coord.epsilons)
        return {
            "head": self.svc.head.state_dict(),
            "optimizer": self.svc.head_opt.state_dict(),
            "scheduler": self.svc.head_sched.state_dict() if self.svc.head_sched is not None else None,
            "relay": relay,
            "epsilons": epsilons,
            "full": self.svc.full_state() if self.full else None,  # split-he-full: enc(W) and its counters
            "counters": (self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done,
                         self.svc.bytes_up, self.svc.bytes_down),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.svc.head.load_state_dict(state["head"])
        self.svc.head_opt.load_state_dict(state["optimizer"])
        if self.svc.head_sched is not None and state.get("scheduler") is not None:
            self.svc.head_sched.load_state_dict(state["scheduler"])
        with self.coord.cond:
            self.coord.relay_version, self.coord.relay_blob, self.coord.next_step = state["relay"]
            self.coord.epsilons = dict(state.get("epsilons") or {})
        (self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done,
         self.svc.bytes_up, self.svc.bytes_down) = state["counters"]
        if self.full:
            self.svc.load_full_state(state.get("full"))

    def model_state(self) -> dict[str, Any]:
        """best_model.pt's model: the head (split-plain / split-he) and the sealed relay.

        split-he-full: the server holds no plaintext head, so first one hospital releases it (decrypts enc(W))
        and writes the released model on its side, ``<hospital out>/best_model.pt``; the server's file keeps
        the sealed relay and the best epoch's enc(W) (ciphertexts, for the final test).
        """
        if self.full:
            self.coord.evaluate(RELEASE, release_epoch=self.epochs_done,
                                release_val_auroc=float(self._last_val.get("auroc_macro", math.nan)))
            # the best epoch's enc(W) as the server holds it (ciphertexts only), for the final test
            state = self.svc.full_state()
            out: dict[str, Any] = ({"_full.weights": torch.frombuffer(bytearray(state["weights"]), dtype=torch.uint8).clone()}
                                   if state is not None else {})
        else:
            out = {f"head.{k}": v.detach().clone() for k, v in self.svc.head.state_dict().items()}
        with self.coord.cond:
            if self.coord.relay:
                out["_relay.version"] = torch.tensor(self.coord.relay_version, dtype=torch.int64)
                blob = self.coord.relay_blob
                out["_relay.sealed"] = (torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone() if blob
                                        else torch.zeros(0, dtype=torch.uint8))
        return out

    def load_model_state(self, state: dict[str, Any]) -> None:
        """The best epoch's head and relay; split-he-full: the best epoch's enc(W) back on the head, as the
        in-process run puts back the best epoch's head (there re-encrypted by the key holders)."""
        if not self.full:
            self.svc.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        elif "_full.weights" in state:
            self.svc.restore_full_weights(state["_full.weights"].numpy().tobytes())
        if "_relay.version" in state:
            with self.coord.cond:
                self.coord.relay_version = int(state["_relay.version"])
                self.coord.relay_blob = state["_relay.sealed"].numpy().tobytes()

    def epoch_extras(self) -> dict[str, Any]:
        return dict(self._extras)

    def result_extras(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {
            "protocol": {
                "regime": cfg.regime,
                "hospitals": self.coord.num_sites,
                "encoder_trainable": not cfg.model.freeze_encoder,
                "he_preset": _he_preset(cfg),
                "server_has_secret_key": self.svc.has_secret_key(),
                "transport": "grpc",
                "encoder_relay": self.coord.relay,
            },
            "wire": wire_summary(self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done),
        }
        if self.full:
            out["protocol"].update(head_encrypted=True, **self.svc.full_counters())
        if self.dp:  # as the in-process run reports it, from the epsilons the hospitals reported at EndEpoch
            out["privacy"] = privacy_summary(cfg, self.epsilon_per_site())
        return out


def _he_preset(cfg: Any) -> Optional[str]:
    """The CKKS preset of the run, as the in-process runner reports it (None in split-plain)."""

    return {"split-he": cfg.split.he_preset, "split-he-full": full_preset(cfg)}.get(cfg.regime)


def run_split_server(cfg: Any, out_dir: Any, address: str, pki_dir: Any, insecure: bool, **kw: Any) -> dict[str, Any]:
    """Serve the head of a split-plain / split-he / split-he-full run until it finishes; writes what ``splitfl train`` writes
    (in split-he-full the released plaintext model is written by a hospital, see the module docstring).

    Keywords: ``run_id`` (default: from the config fingerprint), ``turn_timeout_s`` (alias ``round_timeout``;
    300: a hospital silent that long while it should act is skipped for the rest of the epoch),
    ``join_timeout_s`` (600: how long each epoch waits for every hospital's first GetTurn; in the first epoch
    this server runs every hospital must come, else it stops with a RunError naming the missing ones),
    ``eval_timeout_s`` (600), ``finish_grace_s`` (10: how long to wait for every hospital to hear that the run
    is over), ``on_ready`` (called with the bound port once serving), ``max_workers``. ``pki_dir``: the
    server's own folder (``DIR/server`` of ``splitfl certs``: ca.crt, server.crt, server.key, tokens.json),
    refused if it holds a secret (the CA key, a consortium secret, a site's key or token). Rerun on the same
    ``out_dir`` to resume from the checkpoint; the hospitals reconnect by themselves.
    """
    if cfg.regime not in REGIMES:
        raise RunError(f"run_split_server serves {' / '.join(REGIMES)}, not {cfg.regime!r}")
    if pki_dir is not None:  # before loading anything: a wrong folder is refused at once
        load_server_folder(pki_dir, require_tls=not insecure)
    check_split_cut(cfg, remote=True)  # Hello describes the head as affine layers on pooled features
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_id = kw.get("run_id") or f"split-{config_fingerprint(cfg).hex()[:16]}"
    fabric = make_fabric(cfg.train)
    splits = load_splits(cfg.data)
    with _BUILD_LOCK:
        fabric.seed_everything(cfg.seed, verbose=False)
        split_model, _ = build_split_model(cfg.model, splits.task.num_outputs, splits.task.n_channels, cfg.data.size)
    head = split_model.head
    feature_shape = list(split_model.feature_dim)
    del split_model  # the server never uses an encoder
    if cfg.regime == "split-he-full":  # refuse what the encrypted head cannot train before serving anyone
        lin = head.linear_layers()[0]
        full_layout(cfg, lin.in_features, lin.out_features)
    head_opt = make_optimizer(list(head.parameters()), cfg.train)
    head_sched = make_scheduler(head_opt, cfg.train)
    relay = relay_needed(cfg)
    close_on = "relay" if relay else ("update" if cfg.regime == "split-he" else "backward")
    coord = Coordinator(cfg.data.partition.num_sites, relay, close_on,
                        turn_timeout_s=_kw(kw, "turn_timeout_s", "round_timeout", 300.0),
                        join_timeout_s=_kw(kw, "join_timeout_s", "join_timeout", 600.0),
                        eval_timeout_s=_kw(kw, "eval_timeout_s", "eval_timeout", 600.0))
    recorder = None
    if cfg.split.transcript:
        layers = head.linear_layers()
        recorder = TranscriptRecorder(
            out_dir / "transcript", cfg.split.transcript_max_steps,
            {"regime": cfg.regime, "cut": cfg.model.cut, "model": cfg.model.name, "feature_shape": feature_shape,
             "in_features": layers[0].in_features, "num_classes": layers[-1].out_features,
             "head_layers": [[l.in_features, l.out_features] for l in layers], "batch_size": cfg.train.batch_size,
             "he_preset": _he_preset(cfg), "transport": "grpc", "dp_noise_multiplier": cfg.split.dp_noise_multiplier,
             "dp_max_grad_norm": cfg.split.dp_max_grad_norm,
             "config": dataclasses.asdict(cfg)})  # what the server coordinated (the attacker knows it), as in process
    svc = SplitServicer(cfg, run_id, head, head_opt, head_sched, coord, recorder=recorder)
    server, port = serve(svc, address, pki_dir, insecure, kw.get("max_workers"))
    fabric.print(f"[split server] run {run_id}: serving {cfg.regime} on port {port} for {coord.num_sites} hospitals")
    if kw.get("on_ready") is not None:
        kw["on_ready"](port)
    runner = RemoteServerRunner(cfg, splits, svc, coord)
    try:
        result = fit(fabric, runner, cfg, splits, out_dir, f"{cfg.regime} server")
        coord.finish(_kw(kw, "finish_grace_s", "finish_grace", 10.0))  # tells the hospitals the run is over
    finally:
        with coord.cond:
            steps = [dict(r) for r in coord.step_times]
        if steps:  # this process's steps (a resumed server writes only its own)
            write_csv(out_dir / "steps.csv", steps)
        # On a crash the hospitals are NOT told the run is over: they wait for the server to come back and
        # resume from its checkpoint (rerun with the same out_dir).
        server.stop(grace=1.0).wait()
    plot_learning_curves({cfg.regime: result["history"]}, out_dir / "learning_curves.png", f"{cfg.regime} (gRPC)")
    metrics = write_run_metrics(cfg, splits, result, t0, out_dir, print)
    return metrics


# ============================================================================ hospital: the stub


class RemoteSplitServer:
    """The hospital's view of the remote head: the methods the transports call, over gRPC.

    split-he-full: also FullSplitServer's (``layout``, ``backward(.., input_grad=)``, ``needs_refresh``,
    ``replace_weights``, ``export_weights``), so :class:`~splitfl.split.transport.FullHETransport` runs on it
    unchanged. ``export_weights`` downloads for a refresh, or for the release named by ``release_id``.
    """

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
        self.layers: list[Any] = []
        self.he: Any = None
        self.he_mlp: Any = None
        self.recorder = None
        self.optimizer: Any = None
        self.mode = "plain"  # plain | he | he-full, as SplitRunner names them
        self.hello: Any = None
        self.layout: Any = None  # split-he-full: FullHeadLayout (public: shapes, batch capacity, slots)
        self.release_id = 0  # split-he-full: the release request being served (0: export_weights is a refresh)
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

    # ---------------------------------------------------------------- session

    def connect(self, feature_dim: int = 0, context_fingerprint: bytes = b"") -> Any:
        r = self._call(self.stub.Hello, pb.SplitHelloRequest(
            header=self._header(hello=True), client_nonce=os.urandom(16), context_fingerprint=context_fingerprint,
            feature_dim=feature_dim, client_version=SERVER_VERSION))
        with self._lock:
            self.session, self._seq = bytes(r.session.session_id), 0
        self.hello = r
        self.mode = {pb.SPLIT_MODE_HE: "he", pb.SPLIT_MODE_HE_FULL: "he-full"}.get(r.mode, "plain")
        self.layers = [SimpleNamespace(in_features=l.in_features, out_features=l.out_features) for l in r.layers]
        return r

    def bind(self, head: Any, optimizer: Any, scheduler: Any, mode: str, public_context: Optional[bytes] = None,
             batch_capacity: int = 64, recorder: Any = None, initial_weights: Optional[bytes] = None) -> "RemoteSplitServer":
        """``SplitRunner(server_factory=client.bind)``: say Hello (uploading the public context if the server needs it).

        split-he-full (``mode="he-full"``): also the packed initial ``enc(W)``, uploaded if Hello says
        ``weights_needed`` (the first hospital to join; a later one is told the head exists and goes on).
        """
        self.optimizer = optimizer
        fp = b""
        ctx = None
        if mode in ("he", "he-full"):
            ctx = load_public_context(public_context)
            fp = _fp_bytes(context_fingerprint(ctx))
        in_features = head.linear_layers()[0].in_features if hasattr(head, "linear_layers") else head.in_features
        r = self.connect(in_features, fp)
        if mode != self.mode:
            raise ProtocolError(f"this hospital runs split-{mode} but the server runs split-{self.mode}")
        local = [(l.in_features, l.out_features) for l in (head.linear_layers() if hasattr(head, "linear_layers") else [head])]
        if local != [(l.in_features, l.out_features) for l in self.layers]:
            raise ProtocolError(f"head layers {local} differ from the server's")
        if mode == "he":
            if r.context_needed:
                self.upload_context(public_context, fp, galois=ctx.has_galois_keys(), relin=False)
            slots = params_of(ctx).slots
            self.he = SimpleNamespace(slots=slots)
            coeffs = getattr(getattr(head, "act", None), "coeffs", None)
            if len(self.layers) == 2 and coeffs is not None and len(coeffs) <= 3:
                self.he_mlp = SimpleNamespace(in_features=self.layers[0].in_features, hidden=self.layers[0].out_features,
                                              num_classes=self.layers[1].out_features, coeffs=tuple(coeffs))
        if mode == "he-full":
            self._bind_full(r, ctx, public_context, fp, batch_capacity, initial_weights)
        return self

    def _bind_full(self, r: Any, ctx: Any, public_context: bytes, fp: bytes, batch_capacity: int,
                   initial_weights: Optional[bytes]) -> None:
        if r.batch_capacity != batch_capacity:
            raise ProtocolError(f"the server's encrypted head takes batches of {r.batch_capacity}, this hospital {batch_capacity}")
        self.layout = FullHeadLayout(self.layers[0].in_features, self.layers[0].out_features, batch_capacity,
                                     params_of(ctx).slots)
        if r.context_needed:
            self.upload_context(public_context, fp, galois=ctx.has_galois_keys(), relin=True)
        if r.weights_needed:
            if initial_weights is None:
                raise ProtocolError("the server needs the initial encrypted head and this hospital has none to give")
            try:
                self.upload_weights(initial_weights, pb.WEIGHTS_PURPOSE_INITIAL)
            except RemoteError as e:  # another hospital uploaded them between our Hello and now: fine
                if e.code != grpc.StatusCode.ALREADY_EXISTS or e.error_code != pb.ERROR_CODE_OUT_OF_ORDER:
                    raise

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

    # ---------------------------------------------------------------- the SplitServer interface

    def _wire(self) -> int:
        return _WIRE[{"he-full": "full"}.get(self.mode, self.mode)]

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

    # ---------------------------------------------------------------- split-he-full: FullSplitServer's refresh and release

    def needs_refresh(self) -> bool:
        """What the step's Backward said: the server's head spent its update budget."""
        return self._refresh_needed

    def export_weights(self) -> bytes:
        """enc(W) for the key holders: the release being served (``release_id``), else this step's refresh."""
        if self.release_id:
            return self.download_weights(pb.WEIGHTS_PURPOSE_RELEASE, eval_id=self.release_id)
        return self.download_weights(pb.WEIGHTS_PURPOSE_REFRESH, step=self.step)

    def replace_weights(self, payload: bytes) -> None:
        """The refresh's fresh encryption up; it closes the step unless the run relays."""
        self.upload_weights(payload, pb.WEIGHTS_PURPOSE_REFRESH, self.step)
        self._refresh_needed = False

    def predict(self, payload: bytes) -> bytes:
        call = pb.PredictCall(part=0, encoding=pb.PAYLOAD_ENCODING_CKKS_BATCH)
        return self._bidi(self.stub.Predict, pb.PredictRequest, payload, call=call)

    def apply_update(self, payload: bytes) -> None:
        call = pb.ApplyUpdateCall(step=self.step, encoding=pb.PAYLOAD_ENCODING_TENSOR)
        self._call(self.stub.ApplyUpdate, self._requests(pb.ApplyUpdateRequest, payload, call=call))

    def end_epoch(self) -> None:
        """In-process API compatibility: the remote epoch ends with :meth:`end_epoch_remote` (a barrier)."""

    def update_size(self) -> int:
        return sum(l.out_features * (l.in_features + 1) for l in self.layers)

    def has_secret_key(self) -> bool:
        return False  # the hospital cannot know; the server reports its own

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ============================================================================ hospital: the loop


def _hospital_state(runner: Any, sched_epochs: int) -> bytes:
    state = {
        "encoder": runner.encoder.state_dict(),
        "enc_opt": runner.enc_opt.state_dict() if runner.enc_opt is not None else None,
        "enc_sched": runner.enc_sched.state_dict() if runner.enc_sched is not None else None,
        "accountants": [a.state_dict() for a in runner.accountants],
        "noise_rng": runner._noise.get_state(),
        "sched_epochs": sched_epochs,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load_hospital_state(runner: Any, data: bytes) -> int:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # authenticated by AES-GCM first
    runner.encoder.load_state_dict(state["encoder"])
    if runner.enc_opt is not None and state["enc_opt"] is not None:
        runner.enc_opt.load_state_dict(state["enc_opt"])
    if runner.enc_sched is not None and state["enc_sched"] is not None:
        runner.enc_sched.load_state_dict(state["enc_sched"])
    for acc, s in zip(runner.accountants, state["accountants"]):
        acc.load_state_dict(s)
    runner._noise.set_state(state["noise_rng"])
    runner._feature_cache.clear()
    return int(state["sched_epochs"])


def _kw(kw: dict, name: str, alias: str, default: Any) -> Any:
    """A keyword under its name here or the launcher's (splitfl.net.launch) name; None means the default."""
    for key in (name, alias):
        if kw.get(key) is not None:
            return kw[key]
    return default


def _hospital_keys(cfg: Any, out_dir: Path, pki_dir: Any, kw: dict) -> Path:
    """``<out>/keys`` with the hospitals' shared key file, copied in from ``keys_dir`` / ``keys`` / the PKI folder if needed.

    The file is ``consortium.secret`` (split-he) or ``relay.secret`` (split-plain, when something is relayed).
    Looked up in order: ``<out>/keys``, the ``keys_dir`` keyword (a folder), the ``keys`` keyword (the file),
    ``<pki_dir>/<file>``, ``<pki_dir>/keys/<file>``. Missing everywhere, the runner makes one (fine for a
    single hospital; with several, their keys differ and the server refuses the second at Hello).
    """

    target = out_dir / "keys"
    name = "consortium.secret" if cfg.regime in HE_REGIMES else (RELAY_KEY_FILE if relay_needed(cfg) else None)
    if name is None or (target / name).exists():
        return target
    candidates = []
    if kw.get("keys_dir"):
        candidates.append(Path(kw["keys_dir"]) / name)
    if kw.get("keys"):
        candidates.append(Path(kw["keys"]))
    if pki_dir is not None:
        pki = Path(pki_dir)
        candidates += [pki / name, pki / "keys" / name]
        if pki.parent.name == "sites":  # a site folder of a development PKI: the key may sit at the PKI root
            candidates.append(pki.parent.parent / name)
    for c in candidates:
        if c.is_file():
            write_bytes(target / name, c.read_bytes(), 0o600)
            break
    return target


def _site_channel(server: str, site: int, pki_dir: Any, insecure: bool) -> grpc.Channel:
    if pki_dir is None:
        return make_channel(server, insecure=insecure)
    sp = site_paths(pki_dir, site_name(site)) if (Path(pki_dir) / "manifest.json").exists() else site_paths(pki_dir)
    if sp.site != site_name(site):
        raise ValueError(f"{pki_dir} holds the credentials of {sp.site}, not {site_name(site)}")
    creds = None if insecure else channel_credentials(sp.ca_cert, sp.cert, sp.key)
    return make_channel(server, creds, insecure=insecure, site=sp.site, token=read_token(sp.token))


def run_split_site(cfg: Any, site: int, server: str, pki_dir: Any, insecure: bool, out_dir: Any, **kw: Any) -> None:
    """Hospital ``site`` of a split run whose head is served at ``server``; returns when the run is over.

    ``pki_dir``: the PKI root (with manifest.json) or this site's folder (ca.crt, client.crt, client.key, token).
    The hospitals must share one key file, ``consortium.secret`` (split-he) or ``relay.secret`` (split-plain
    with a trainable encoder): it is taken from ``<out_dir>/keys/``, else copied there from the ``keys_dir``
    folder, the ``keys`` file, ``<pki_dir>/``, ``<pki_dir>/keys/`` or the PKI root above a ``sites/<site>``
    folder (see :func:`_hospital_keys`). Keywords: ``run_id`` (as the server's), ``connect_timeout_s``
    (alias ``connect_timeout``; 120), ``reconnect_timeout_s`` (300: how long to wait for a server
    that went away to come back, e.g. restarted to resume from its checkpoint), ``poll_ms`` (2000). Make the
    shared key file first with :func:`ensure_consortium_keys` (two hospitals making it at once would make two
    different keys; the server then refuses one of them at Hello).
    """

    if cfg.regime not in REGIMES:
        raise RunError(f"run_split_site runs {' / '.join(REGIMES)} hospitals, not {cfg.regime!r}")
    check_split_cut(cfg, remote=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = config_fingerprint(cfg)
    run_id = kw.get("run_id") or f"split-{fp.hex()[:16]}"
    fabric = make_fabric(cfg.train)
    splits = load_splits(cfg.data)
    keys_dir = _hospital_keys(cfg, out_dir, pki_dir, kw)
    run_dir = out_dir  # SplitRunner reads <out>/keys/consortium.secret
    site_cfg = copy.deepcopy(cfg)
    site_cfg.split.transcript = False  # the transcript is the server's view: recorded by run_split_server
    channel = _site_channel(server, site, pki_dir, insecure)
    reconnect_s = float(kw.get("reconnect_timeout_s", 300.0))
    first = True
    try:
        while True:
            try:
                grpc.channel_ready_future(channel).result(
                    timeout=_kw(kw, "connect_timeout_s", "connect_timeout", 120.0) if first else reconnect_s)
            except grpc.FutureTimeoutError:
                raise RunError(f"{site_name(site)}: no split server at {server}") from None
            first = False
            client = RemoteSplitServer(channel, site, run_id, fp)
            runner = None
            try:
                # Every (re)connection starts from the initial hospital state; the shared state comes from the relay.
                with _BUILD_LOCK:
                    fabric.seed_everything(cfg.seed, verbose=False)
                    runner = SplitRunner(fabric, site_cfg, splits, run_dir, server_factory=client.bind)
                fabric.print(f"[{site_name(site)}] joined run {run_id} at {server}")
                _site_loop(cfg, site, client, runner, splits, keys_dir, run_id, fp, kw)
                return
            except RemoteError as e:
                # The server went away (it resumes from its checkpoint) or replaced our session: join again.
                # OUT_OF_ORDER: this site was skipped (too slow) while it held a step; it starts over from the
                # relayed state, so a half-done step never leaks into the next one.
                if e.code not in _RECONNECT_CODES and e.error_code not in (pb.ERROR_CODE_UNKNOWN_SESSION,
                                                                           pb.ERROR_CODE_OUT_OF_ORDER):
                    raise
                fabric.print(f"[{site_name(site)}] lost the server ({e}); reconnecting")
                time.sleep(0.5)
            finally:
                if runner is not None:
                    runner.close()
    finally:
        channel.close()


_RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


POSITION_FILE = "split_position.json"


def _read_position(path: Path, run_id: str) -> Optional[dict]:
    """The hospital's place in the epoch after its last closed step (written by :func:`_site_loop`), if of this run."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("run_id") == run_id else None


def _site_loop(cfg: Any, site: int, client: RemoteSplitServer, runner: Any, splits: Any, keys_dir: Path,
               run_id: str, fp: bytes, kw: dict) -> None:
    if site >= len(runner.sites):
        raise RunError(f"site {site} does not exist: the partition has {len(runner.sites)} sites")
    relay = relay_needed(cfg)
    if relay and not cfg.model.freeze_encoder and not runner.encoder_trainable:
        raise RunError("model.freeze_encoder is false but the encoder has no trainable parameters")
    sealer = RelaySealer(relay_key_material(keys_dir, runner.he or runner.full), run_id, fp) if relay else None
    my_version, sched_epochs = 0, 0
    head_epochs = 0  # split-he-full: epochs the hospitals' schedule of the encrypted head's lr has stepped here
    poll = int(kw.get("poll_ms", 2000))
    position_file = keys_dir.parent / POSITION_FILE  # <out>/split_position.json
    saved = _read_position(position_file, run_id)

    def sync(version: int) -> None:
        nonlocal my_version, sched_epochs
        if not relay or version == my_version:
            return
        got, blob = client.download_relay()
        if got != version and got < version:
            raise ProtocolError(f"relay version {got} is older than announced {version}")
        sched_epochs = _load_hospital_state(runner, sealer.open(blob, got))
        my_version = got

    epoch = 0
    queue = list(runner._site_batches(site, epoch))
    pos, loss_sum, samples, ended, fresh_epoch = 0, 0.0, 0, False, True
    while True:
        r = client.get_turn(epoch, len(queue) - pos, poll)
        if r.state == pb.TURN_STATE_RUN_DONE:
            return
        if r.state == pb.TURN_STATE_EVALUATE:
            sync(r.relay_version)
            dataset = splits.val if r.eval_split == "val" else splits.test
            client.report_eval(r.eval_id, runner.evaluate(dataset))
            continue
        if r.state == pb.TURN_STATE_RELEASE:
            sync(r.relay_version)
            client.report_eval(r.eval_id, _release(cfg, client, runner, splits, keys_dir.parent, r))
            continue
        if r.epoch != epoch and r.state == pb.TURN_STATE_WAIT and r.epoch > epoch:
            epoch = int(r.epoch)
            queue = list(runner._site_batches(site, epoch))
            pos, loss_sum, samples, ended, fresh_epoch = 0, 0.0, 0, False, True
            continue
        if r.state == pb.TURN_STATE_YOURS:
            sync(r.relay_version)
            if fresh_epoch:
                runner.split_model.train()
                fresh_epoch = False
            while runner.enc_sched is not None and sched_epochs < epoch:  # the in-process end-of-epoch step, lazily
                with warnings.catch_warnings():  # a relayed optimizer has stepped, but this object has not
                    warnings.simplefilter("ignore", UserWarning)
                    runner.enc_sched.step()
                sched_epochs += 1
            while runner.full and runner.head_sched is not None and head_epochs < epoch:  # in-process train_epoch's end
                runner.head_opt.step()  # a no-op (no gradients) that keeps the scheduler's order, as in process
                runner.head_sched.step()
                head_epochs += 1
            if saved is not None and pos == 0 and saved["epoch"] == epoch and saved["step"] < r.step:
                # This process restarted mid-epoch (killed after a step) and the server did not: go on after the
                # last step it closed. A server resumed from its checkpoint replays the epoch and grants the same
                # step ids again (saved step >= r.step): the epoch then starts over from the first batch.
                pos, loss_sum, samples = int(saved["pos"]), float(saved["loss_sum"]), int(saved["samples"])
            saved = None
            client.begin_step(r.step)
            index = queue[pos]
            loss = runner._step(site, index)
            pos += 1
            loss_sum += loss * len(index)
            samples += len(index)
            if relay:
                version = int(r.relay_version) + 1
                client.upload_relay(r.step, version, sealer.seal(_hospital_state(runner, sched_epochs), version))
                my_version = version
            write_json(position_file, {"run_id": run_id, "epoch": epoch, "step": int(r.step), "pos": pos,
                                       "loss_sum": loss_sum, "samples": samples})
            continue
        if r.state == pb.TURN_STATE_EPOCH_DONE and not ended:
            epsilon = 0.0
            if runner.dp:  # this site's accountant as relayed (current even if this runner was rebuilt on a reconnect)
                sync(r.relay_version)
                epsilon = runner.site_epsilon(site)
            client.end_epoch_remote(epoch, loss_sum, samples, epsilon)
            ended = True
            print(f"[{site_name(site)}] epoch {epoch + 1}: {pos} step(s) done, loss {loss_sum / max(samples, 1):.4f}", flush=True)
            continue
        time.sleep(min(r.retry_after_ms, 200) / 1000 if r.state == pb.TURN_STATE_WAIT else 0.05)


def _release(cfg: Any, client: RemoteSplitServer, runner: Any, splits: Any, out_dir: Path, r: Any) -> dict[str, Any]:
    """split-he-full: decrypt the server's head and write the released model, ``<out>/best_model.pt``, here.

    The same file ``splitfl train`` writes for split-he-full (encoder + released head, config, task, epoch,
    validation AUROC): plaintext weights exist only at the key holders. Returns the ReportEval acknowledgement.
    """

    client.release_id = int(r.eval_id)
    try:
        state = runner.model_state()  # SplitRunner: the key holders decrypt enc(W) into the consortium's model
    finally:
        client.release_id = 0
    best = {"epoch": int(r.release_epoch), "score": float(r.release_val_auroc)}
    path = out_dir / BEST_MODEL
    save_checkpoint(path, best_model_payload(state, cfg, splits.task, best))
    print(f"[{site_name(client.site)}] released the head of epoch {best['epoch']} to {path}", flush=True)
    return {"released": True, "epoch": best["epoch"]}
