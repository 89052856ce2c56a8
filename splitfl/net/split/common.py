"""What both sides of the split service share: the wire's constants, the run's identity, errors, relay sealing.

The server side (:mod:`~splitfl.net.split.coordinator`, :mod:`~splitfl.net.split.servicer`,
:mod:`~splitfl.net.split.server`) and the hospital (:mod:`~splitfl.net.split.hospital`) both import from here
and never from each other, so what one side may assume about the other is exactly what this module holds: the
protocol's constants and payload limits, the config fingerprint a run is known by, the error detail carried in
the trailing metadata (raised as ``_Abort`` by the server, read back as :class:`RemoteError` by a hospital),
and the relay's sealing (:class:`RelaySealer`, under a key only the hospitals hold: the server stores blobs it
cannot open). The wire's own names (the hospital's payload limit and version, :class:`RemoteError`, site names)
live in the torch-free :mod:`~splitfl.net.split.client` and are re-exported here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from splitfl.artifacts import write_bytes
from splitfl.he.keys import consortium_secret_context
from splitfl.net import ERROR_METADATA_KEY, PROTOCOL_VERSION
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.split.client import (  # noqa: F401  (the wire's names, re-exported to both sides)
    _WIRE,
    MAX_PAYLOAD_BYTES,
    SERVER_VERSION,
    RemoteError,
    _remote_error,
    site_name,
)
from splitfl.split.runner import full_preset
from splitfl.tensors import ProtocolError

MAX_CONTEXT_BYTES = 1 << 30  # public contexts with Galois keys
RELAY_KEY_FILE = "relay.secret"
REGIMES = ("split-plain", "split-he", "split-he-full")
HE_REGIMES = ("split-he", "split-he-full")  # the hospitals hold the consortium's CKKS secret key
# a regime's mode as the servicer names it, its SplitMode in Hello (its payload encoding on the wire: client._WIRE)
_MODES = {"split-plain": "plain", "split-he": "he", "split-he-full": "full"}
_PB_MODES = {"plain": pb.SPLIT_MODE_PLAIN, "he": pb.SPLIT_MODE_HE, "full": pb.SPLIT_MODE_HE_FULL}
# one lock for both sides: a process may run the server and hospitals together (the tests do)
_BUILD_LOCK = threading.Lock()  # seeding + model construction use torch's global RNG: one party at a time per process


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


def _kw(kw: dict, name: str, alias: str, default: Any) -> Any:
    """A keyword under its name here or the launcher's (splitfl.net.launch) name; None means the default."""
    for key in (name, alias):
        if kw.get(key) is not None:
            return kw[key]
    return default


# ============================================================================ errors


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
