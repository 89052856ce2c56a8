"""Consortium keys: secret contexts for hospitals, public contexts for the server.

The hospitals of a consortium share one CKKS secret key (the file written by
:func:`save_secret_context`, mode 0600); the server only ever receives
:func:`public_context_bytes`: the parameters and the public key, with no
secret key and no evaluation keys a linear head does not need.
:func:`context_fingerprint` hashes the parameters and the public key, so a
message encrypted under another consortium's key or another parameter set is
refused before any computation.

The hot path of the protocol runs on SEAL directly (:class:`SealEngine`, built
from a ``ts.Context``) because TenSEAL's ``CKKSVector`` re-encodes the plaintext
on every multiplication, rescales after every product, cannot fill the
imaginary half of the slots and drops the seed of symmetric ciphertexts, which
doubles their size on the wire. TenSEAL's SEAL bindings only serialise through
file paths, so the engine moves bytes through an anonymous in-memory file
(``memfd``), never through the disk.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Optional, Union

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from splitfl.artifacts import write_bytes

from .params import PRESETS, CKKSParams, HEError, check_key_switching, check_security

__all__ = [
    "SealEngine",
    "context_fingerprint",
    "create_secret_context",
    "engine_for",
    "load_public_context",
    "load_secret_context",
    "params_of",
    "public_context_bytes",
    "save_secret_context",
]

PathLike = Union[str, os.PathLike]

# Files written by save_secret_context start with this line, so a wrong file
# (a public context, a checkpoint) is named as such instead of failing inside SEAL.
_SECRET_MAGIC = b"SPLITFL-CKKS-SECRET-CONTEXT v1\n"


def create_secret_context(params: CKKSParams, galois: bool = False, n_threads: Optional[int] = None) -> ts.Context:
    """New consortium context (secret key, public key; Galois keys only if asked) for the hospitals.

    Galois keys are large (hundreds of MB at N=16384) and only the per-sample
    rotation baseline needs them; the packed linear head uses none.
    """
    check_security(params)
    if galois:
        check_key_switching(params)
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
        n_threads=n_threads,
    )
    ctx.global_scale = params.scale
    if galois:
        ctx.generate_galois_keys()
    return ctx


def save_secret_context(ctx: ts.Context, path: PathLike) -> Path:
    """Write the hospital's secret context atomically with mode 0600. Never send this file to the server."""
    if not ctx.is_private():
        raise HEError(f"save_secret_context({str(path)!r}): the context holds no secret key; nothing secret to save.")
    data = _SECRET_MAGIC + ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=True, save_relin_keys=True
    )
    return write_bytes(Path(path), data, mode=0o600)


def load_secret_context(path: PathLike, n_threads: Optional[int] = None) -> ts.Context:
    """Read a file written by :func:`save_secret_context`; error if it holds no secret key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HEError(f"Cannot read the secret context {str(path)!r}: {e}.") from e
    if not data.startswith(_SECRET_MAGIC):
        raise HEError(
            f"{str(path)!r} is not a splitfl secret context (it does not start with the save_secret_context header); "
            "a public context or another file cannot decrypt."
        )
    ctx = _context_from(data[len(_SECRET_MAGIC) :], f"secret context file {str(path)!r}", n_threads)
    if not ctx.is_private():
        raise HEError(f"{str(path)!r} holds no secret key: the hospitals need the file from save_secret_context.")
    return ctx


def consortium_secret_context(key_file: PathLike, preset: str, what: str = "he_preset") -> ts.Context:
    """The consortium's secret context: read from ``key_file``, or made from ``preset`` and saved there.

    Made once by the key holders (hospitals) and reused on resume, so a resumed
    run decrypts what it encrypted before; the server never receives this file.
    ``what`` names the config key in the error for an unknown preset.
    """

    key_file = Path(key_file)
    if key_file.exists():
        return load_secret_context(key_file)
    if preset not in PRESETS:
        raise HEError(f"{what}={preset!r} is not a preset; choose one of {sorted(PRESETS)}")
    ctx = create_secret_context(PRESETS[preset])
    save_secret_context(ctx, key_file)
    return ctx


def public_context_bytes(ctx: ts.Context, *, relin: bool = False, galois: bool = False) -> bytes:
    """The server's context: parameters + public key, no secret key, evaluation keys only if asked.

    A linear head needs no evaluation keys (no ciphertext-ciphertext product,
    no rotation); ``relin=True`` is for heads that square ciphertexts.
    """
    if galois and not ctx.has_galois_keys():
        raise HEError(
            "public_context_bytes(galois=True): the context has no Galois keys (create_secret_context(galois=True))."
        )
    data = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=galois, save_relin_keys=relin)
    if 3 in _proto_fields(data, "public context"):  # TenSEALContextProto.private_context
        raise HEError("internal: the public context would carry a private part; refusing to release it.")
    return data


def load_public_context(data: bytes, n_threads: Optional[int] = None) -> ts.Context:
    """Server side: load :func:`public_context_bytes`, refusing any context that can decrypt."""
    ctx = _context_from(data, "public context bytes", n_threads)
    if ctx.is_private():
        raise HEError(
            "These context bytes contain a SECRET key; the server must only receive public_context_bytes(ctx). "
            "Rotate the consortium key: it has left the hospitals."
        )
    return ctx


def context_fingerprint(ctx: ts.Context) -> str:
    """Stable SHA-256 of the encryption parameters and the public key (same for a context and its public copy)."""
    return engine_for(ctx).fingerprint


def params_of(ctx: ts.Context) -> CKKSParams:
    """The :class:`CKKSParams` a context was built with (named after its preset when it matches one)."""
    return engine_for(ctx).params


def _context_from(data: bytes, what: str, n_threads: Optional[int]) -> ts.Context:
    if not isinstance(data, (bytes, bytearray)):
        raise HEError(f"{what}: expected bytes, got {type(data).__name__}.")
    try:
        return ts.context_from(bytes(data), n_threads=n_threads)
    except Exception as e:  # TenSEAL raises bare ValueError/RuntimeError on malformed protobufs
        raise HEError(f"{what} are not a valid TenSEAL context ({e}).") from e


# ---------------------------------------------------------------------------
# Minimal protobuf reader for TenSEALContextProto (tenseal/proto/tensealcontext.proto):
# 1 encryption_parameters (bytes), 2 public_context {1 public_key, 2 auto_flags,
# 3 scale (double), 4 relin_keys, 5 galois_keys}, 3 private_context {1 secret_key, ...}.


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _proto_fields(buf: bytes, what: str) -> dict[int, list]:
    fields: dict[int, list] = {}
    i = 0
    try:
        while i < len(buf):
            key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _varint(buf, i)
            elif wire == 1:
                value, i = buf[i : i + 8], i + 8
            elif wire == 2:
                size, i = _varint(buf, i)
                value, i = buf[i : i + size], i + size
            elif wire == 5:
                value, i = buf[i : i + 4], i + 4
            else:
                raise ValueError(f"wire type {wire}")
            if i > len(buf):
                raise ValueError("truncated")
            fields.setdefault(number, []).append(value)
    except (IndexError, ValueError) as e:
        raise HEError(f"{what}: not a TenSEAL context protobuf ({e}).") from e
    return fields


# ---------------------------------------------------------------------------
# SEAL view of a context


class _Scratch:
    """An anonymous in-memory file: the only way TenSEAL's SEAL bindings (de)serialise."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        try:
            self.fd = os.memfd_create("splitfl-he", getattr(os, "MFD_CLOEXEC", 0))
            self.path = f"/proc/self/fd/{self.fd}"
            unlink = None
        except (AttributeError, OSError):  # not Linux: a 0600 temp file, in RAM where possible
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.fd, self.path = tempfile.mkstemp(prefix="splitfl-he-", dir=folder)
            unlink = self.path
        self._finalizer = weakref.finalize(self, _close_scratch, self.fd, unlink)

    def write(self, data: bytes) -> None:
        # overwrite, then cut to size: the file keeps the pages it has (truncating to 0 first would free them)
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def read(self) -> bytes:
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def wipe(self) -> None:
        os.ftruncate(self.fd, 0)


def _close_scratch(fd: int, unlink: Optional[str]) -> None:
    try:
        os.close(fd)
    finally:
        if unlink and os.path.exists(unlink):
            os.unlink(unlink)


class SealEngine:
    """SEAL encoder/evaluator (and, with a secret key, encryptor/decryptor) for one ``ts.Context``.

    Ciphertexts are fresh at ``first_parms_id`` (all data primes, scale 2^scale_bits);
    after one rescale they are at ``next_parms_id`` with the same scale.
    """

    def __init__(self, ctx: ts.Context) -> None:
        self.private = bool(ctx.is_private())
        if not ctx.has_public_key():
            raise HEError(
                "This context has no public key (symmetric TenSEAL context); build contexts with "
                "create_secret_context(params) so the server can check which key a message is under."
            )
        raw = ctx.serialize(
            save_public_key=True, save_secret_key=self.private, save_galois_keys=False, save_relin_keys=False
        )
        top = _proto_fields(raw, "context")
        params_bytes = top[1][0]
        public = _proto_fields(top[2][0], "public context") if 2 in top else {}
        self._public_key_bytes: bytes = public.get(1, [b""])[0]
        scale = struct.unpack("<d", public[3][0])[0] if 3 in public else -1.0
        if scale <= 0 or not math.log2(scale).is_integer():
            raise HEError(
                f"The context's global_scale ({scale}) is not a power of two; create the context with "
                "create_secret_context(params), which sets it to 2**params.scale_bits."
            )
        self.fingerprint = "sha256:" + hashlib.sha256(
            b"splitfl/ckks-context/v1\0"
            + struct.pack("<Q", len(params_bytes))
            + params_bytes
            + struct.pack("<Q", len(self._public_key_bytes))
            + self._public_key_bytes
        ).hexdigest()

        self._io = _Scratch()
        parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
        with self._io.lock:
            self._io.write(params_bytes)
            parms.load(self._io.path)
        self.context = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():
            raise HEError(f"SEAL rejects these parameters: {self.context.parameters_error_message()}.")
        self.encoder = sa.CKKSEncoder(self.context)
        self.evaluator = sa.Evaluator(self.context)
        self.slots = self.encoder.slot_count()
        self.scale = scale

        first = self.context.first_context_data()
        self.first_parms_id = first.parms_id()
        self.levels = first.chain_index()
        self.data_primes = [m.value() for m in first.parms().coeff_modulus()]
        nxt = first.next_context_data() if self.levels >= 1 else None
        self.next_parms_id = nxt.parms_id() if nxt is not None else None
        key_bits = tuple(m.bit_count() for m in self.context.key_context_data().parms().coeff_modulus())
        n = parms.poly_modulus_degree()
        scale_bits = int(math.log2(scale))
        name = next(
            (
                p.name
                for p in PRESETS.values()
                if (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits) == (n, key_bits, scale_bits)
            ),
            "custom",
        )
        self.params = CKKSParams(n, key_bits, scale_bits, name)

        self._encryptor = self._decryptor = None
        self.secret_key: sa.SecretKey | None = None  # key holders only: e.g. to generate extra Galois keys
        if self.private:
            secret = _proto_fields(top[3][0], "private context")[1][0]
            sk = sa.SecretKey()
            with self._io.lock:
                try:
                    self._io.write(secret)
                    sk.load(self.context, self._io.path)
                finally:
                    self._io.wipe()
            self.secret_key = sk
            self._encryptor = sa.Encryptor(self.context, sk)
            self._decryptor = sa.Decryptor(self.context, sk)
        self._zero_encryptor: Optional[sa.Encryptor] = None
        self._scratch = threading.local()

    # -- serialisation ------------------------------------------------------
    def save(self, obj: object) -> bytes:
        """SEAL bytes of a Ciphertext / seeded SerializableCiphertext / Plaintext."""
        with self._io.lock:
            obj.save(self._io.path)  # type: ignore[attr-defined]
            return self._io.read()

    def load_ciphertext(self, data: bytes, what: str) -> sa.Ciphertext:
        """Parse SEAL ciphertext bytes, with SEAL's own validity checks; HEError naming ``what`` if invalid."""
        ct = sa.Ciphertext()
        with self._io.lock:
            try:
                self._io.write(data)
                ct.load(self.context, self._io.path)
            except Exception as e:  # SEAL raises std::logic_error / invalid_argument
                raise HEError(f"{what} is not a valid ciphertext for this context ({e}).") from e
        return ct

    # -- hospital side -------------------------------------------------------
    def _need_secret(self, action: str) -> None:
        if not self.private:
            raise HEError(f"{action} needs the hospital's secret context; this one is public (server side).")

    def encrypt(self, values: np.ndarray, scale: Optional[float] = None) -> bytes:
        """Encrypt ``slots`` complex values under the secret key; returns seeded SEAL bytes (half size).

        ``scale`` (default the context's 2^scale_bits) lets a product land on an exact scale after its rescale.
        The plaintext is a per-thread scratch object: encoding into memory already allocated saves ~10 %.
        """
        self._need_secret("Encryption")
        pt = getattr(self._scratch, "plain", None)
        if pt is None:
            pt = self._scratch.plain = sa.Plaintext()
        self.encoder.encode(values.tolist(), self.scale if scale is None else float(scale), pt)
        return self.save(self._encryptor.encrypt_symmetric(pt))  # type: ignore[union-attr]

    def decrypt(self, ct: sa.Ciphertext) -> np.ndarray:
        """All ``slots`` complex values of a ciphertext."""
        self._need_secret("Decryption")
        pt = sa.Plaintext()
        self._decryptor.decrypt(ct, pt)  # type: ignore[union-attr]
        return np.array(self.encoder.decode_complex(pt), dtype=np.complex128)

    # -- server side ---------------------------------------------------------
    def encode(self, values: np.ndarray, parms_id: list, scale: float,
               out: Optional[sa.Plaintext] = None) -> sa.Plaintext:
        """A plaintext of ``values``; into ``out`` (a plaintext no longer needed) to reuse its memory."""
        pt = sa.Plaintext() if out is None else out
        self.encoder.encode(values.tolist(), parms_id, scale, pt)
        return pt

    def encrypt_zero(self, parms_id: list, scale: float) -> sa.Ciphertext:
        """A fresh public-key encryption of zero (for an output every weight of which is zero)."""
        if self._zero_encryptor is None:
            pk = sa.PublicKey()
            with self._io.lock:
                self._io.write(self._public_key_bytes)
                pk.load(self.context, self._io.path)
            self._zero_encryptor = sa.Encryptor(self.context, pk)
        ct = sa.Ciphertext()
        self._zero_encryptor.encrypt_zero(parms_id, ct)
        ct.scale = scale
        return ct


_ENGINES: "weakref.WeakKeyDictionary[ts.Context, SealEngine]" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(ctx: ts.Context) -> SealEngine:
    """The (cached) :class:`SealEngine` of a context; rebuilt if the context lost or gained its secret key."""
    if not isinstance(ctx, ts.Context):
        raise HEError(
            f"Expected a tenseal.Context (create_secret_context / load_public_context), got {type(ctx).__name__}."
        )
    with _ENGINES_LOCK:
        eng = _ENGINES.get(ctx)
        if eng is None or eng.private != bool(ctx.is_private()):
            eng = SealEngine(ctx)
            _ENGINES[ctx] = eng
        return eng
