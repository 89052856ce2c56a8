"""CKKS-encrypted aggregation for FedAvg: sites encrypt, the server adds, key holders decrypt.

In the ``fedavg+he`` regime every site (hospital) holds the consortium's secret
context; the server holds only the public context and never sees an
individual update in the clear. One round:

1. site k: :func:`encrypt_update` (``values`` = its model delta, ``count`` =
   its sample count n_k) packs ``n_k * values`` into as few ciphertexts as the
   ring allows and sends the bytes; n_k travels in the clear;
2. server: :func:`sum_encrypted` (or :class:`EncryptedSum`, one payload at a
   time) checks each payload, adds the ciphertexts (additions only: depth 0)
   and the counts; :func:`check_payload` checks one site's payload on its own,
   so a bad or late site can be dropped and the round goes on without it;
3. key holders: :func:`decrypt_aggregate` returns ``sum_k n_k x_k / sum_k n_k``
   and the total count.

Packing. Each CKKS slot is complex; both halves carry a value, so a
ciphertext of ring degree N holds N reals (8192 for the ``aggregation``
preset) and a vector of length L needs ceil(L / N) ciphertexts. Sites encrypt
with the secret key (symmetric encryption), whose ciphertexts SEAL serialises
with a seed in place of their second (uniformly random) polynomial: half the
bytes. They are encrypted at the *last* level of the modulus chain, where one
prime is left (60 bits for ``aggregation``): 8 bytes per value up, against 4
for float32 plaintext. The server's sum is an ordinary ciphertext (the seed
is gone once two are added): 16 bytes per value down. SEAL compresses its
serialisation with zstd by default; a uniformly random 60-bit coefficient in
a 64-bit word does not compress (< 1 %), so the sizes above are what travels.

Range. Values are stored as round(v * 2^scale) modulo the remaining prime q; a
slot holding more than about q / 2^(scale+1) wraps around and decrypts to
garbage. :func:`capacity` is the largest |sum_k n_k x| the parameters hold
(2^(bits(q) - scale_bits - 3): one bit for the sign, half a bit for the two
values packed in a complex slot, half a bit of margin for q below its power of
two and the noise); 2^21 ~ 2.1e6 for ``aggregation``. Each site declares the
public bound ``count * value_bound`` (``value_bound`` is a configuration
constant, 1.0 by default, for deltas with |x| <= 1; nothing derived from the
data), refuses to encrypt a value above ``value_bound``, and the server
refuses a payload that would take the sum of declared bounds past the
capacity. Only the counts' ratios matter, so large counts can be sent in
coarser units (n_k / 1000).

Precision. Decryption adds the encryption noise of every site and the
encoding rounding, an independent error of standard deviation
sqrt(K * N/2 * 10.6) / 2^scale per value for K sites (about 3e-9 * sqrt(K) for
``aggregation``); :func:`error_bound` is 8 standard deviations plus the
float64 rounding of the encoder. The mean's error is that divided by the total
count.

Wire format (little-endian)::

    magic "SFAG" | version u16 | kind u8 (1 update, 2 aggregate) | 0 u8
    | context fingerprint 32 B | length u64 | count f64 | bound f64
    | sites u32 | n u32 | n x ciphertext length u32
    | SHA-256 of everything before it and of the body, 32 B | body

``bound`` is the declared bound on |slot values| (count * value_bound, summed
over the sites of an aggregate). As in :mod:`splitfl.he.wire`, the digest
detects truncation and corruption but is not a MAC: sender authentication is
the transport's job (TLS).

Limitation: the key holders must not hand the *exact* decrypted aggregate
(float64) back to a party that holds the aggregate ciphertext (the server):
CKKS decryptions carry the encryption noise, from which that party can learn
about the secret key (Li and Micciancio, 2021). Rounding the model to float32
drops most of the noise bits (they sit ~1e-8 / total count below the values)
but is not a proof; where the server must see the new model, add noise
(e.g. the DP noise of the round) or round coarsely before releasing it.
"""
from __future__ import annotations

import math
import struct
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from .keys import SealEngine, engine_for
from .params import CKKSParams, HEError, check_depth
from .wire import _check_seal_header, pack_frame, read_frame

__all__ = [
    "AGGREGATION_PRESET",
    "DEFAULT_VALUE_BOUND",
    "FORMAT_VERSION",
    "MAGIC",
    "EncryptedSum",
    "PayloadInfo",
    "capacity",
    "check_payload",
    "decrypt_aggregate",
    "encrypt_update",
    "error_bound",
    "load_update",
    "n_ciphertexts",
    "sum_encrypted",
    "values_per_ciphertext",
]

AGGREGATION_PRESET = "aggregation"
MAGIC = b"SFAG"
FORMAT_VERSION = 1
# Public bound on |update values| a site guarantees unless told otherwise: model deltas are well below 1.
DEFAULT_VALUE_BOUND = 1.0

_KINDS = {1: "update", 2: "aggregate"}
_KIND_CODE = {v: k for k, v in _KINDS.items()}
_HEAD = struct.Struct("<4sHBB32sQddII")  # up to and including n
_DIGEST = 32
_MAX_CIPHERTEXTS = 1 << 20
# SEAL samples the encryption error from a centered binomial distribution of variance 21/2; the
# encoder rounds each coefficient (variance 1/12). Per slot part: N/2 coefficients' worth of each.
_NOISE_VARIANCE = 10.5 + 1.0 / 12.0
_NOISE_SIGMAS = 8.0


# ----------------------------------------------------------------------------- sizing


def capacity(params: CKKSParams) -> float:
    """Largest |sum_k n_k x| one slot holds: 2^(bits of the first prime - scale_bits - 3).

    Ciphertexts live at the last level, where only the first prime q is left,
    so a value v is round(v * 2^scale) mod q. A b-bit prime is at least
    2^(b-1), so |coefficients| must stay below 2^(b-2); packing two values per
    complex slot can raise a coefficient to sqrt(2) times the largest value.
    """
    check_depth(params, 0)
    return float(2 ** (params.coeff_mod_bit_sizes[0] - params.scale_bits - 3))


def error_bound(params: CKKSParams, n_sites: int = 1, magnitude: float = 0.0) -> float:
    """High-probability bound on |decrypted sum - exact sum| per value, for ``n_sites`` fresh encryptions.

    8 standard deviations of the encryption noise and encoding rounding
    (failure odds ~1e-15 per value), plus the float64 rounding of the encoder
    and decoder relative to ``magnitude`` (the declared bound of the values).
    Divide by the total count for the error of the weighted mean.
    """
    if n_sites < 1:
        raise HEError(f"error_bound: n_sites={n_sites} must be >= 1.")
    n = params.poly_modulus_degree
    noise = _NOISE_SIGMAS * math.sqrt(n_sites * (n / 2) * _NOISE_VARIANCE) / params.scale
    rounding = 4 * math.log2(n) * np.finfo(np.float64).eps * float(magnitude)
    return noise + rounding


def values_per_ciphertext(ctx: ts.Context) -> int:
    """Reals one ciphertext carries: N (two per complex slot)."""
    return 2 * engine_for(ctx).slots


def n_ciphertexts(ctx: ts.Context, length: int) -> int:
    """Ciphertexts of an update of ``length`` values: ceil(length / N)."""
    return -(-_checked_length(length) // values_per_ciphertext(ctx))


# ----------------------------------------------------------------------------- wire format


@dataclass(frozen=True)
class PayloadInfo:
    """The checked header of a payload: what it holds, for how many samples and sites."""

    kind: str  # "update" (one site) or "aggregate" (a server sum)
    length: int
    count: float  # n_k, or sum_k n_k for an aggregate
    bound: float  # declared bound on |slot values|: count * value_bound (summed for an aggregate)
    n_sites: int
    n_ciphertexts: int
    nbytes: int
    digest: str  # the SHA-256 the payload carries, hex (identifies it, e.g. to refuse a replayed update)


def _pack(eng: SealEngine, kind: str, length: int, count: float, bound: float, n_sites: int, cts: list[bytes]) -> bytes:
    fp = bytes.fromhex(eng.fingerprint.split(":", 1)[-1])
    fields = (MAGIC, FORMAT_VERSION, _KIND_CODE[kind], 0, fp, length, float(count), float(bound), n_sites)
    return pack_frame(_HEAD, fields, cts)


def _parse(eng: SealEngine, data: object, length: int, kind: str, what: str) -> tuple[PayloadInfo, list[memoryview]]:
    """Check everything but the ciphertexts' contents; HEError naming ``what`` and the field at fault.

    In order: size and magic, version, declared lengths vs the bytes received
    (truncation), SHA-256 (corruption), context fingerprint (other key or
    parameters), kind, vector length, ciphertext count, count, bound, sites,
    and each ciphertext's SEAL header.
    """
    frame = read_frame(data, _HEAD, MAGIC, FORMAT_VERSION, _MAX_CIPHERTEXTS, what,
                       "a splitfl encrypted update/aggregate")
    _, _, kind_code, reserved, fp, n_values, count, bound, n_sites, n = frame.fields
    theirs = "sha256:" + fp.hex()
    if theirs != eng.fingerprint:
        raise HEError(
            f"{what} was encrypted under context {theirs[:19]}..., this context is {eng.fingerprint[:19]}...: "
            "another consortium key or parameter set. Sites and server must use the current consortium key "
            f"(the server: its public context) with the {AGGREGATION_PRESET!r} parameters."
        )
    if reserved != 0 or kind_code not in _KINDS:
        raise HEError(f"{what}: unknown payload kind code {kind_code} (reserved byte {reserved}).")
    got_kind = _KINDS[kind_code]
    if got_kind != kind:
        hint = (
            " The server's sum is decrypted with decrypt_aggregate; a single site's update is only ever summed."
            if kind == "update"
            else " Only the server's sum (sum_encrypted) is decrypted, never a single site's update."
        )
        raise HEError(f"{what} is an encrypted {got_kind}, expected an encrypted {kind}.{hint}")
    if n_values != length:
        raise HEError(
            f"{what} holds a vector of {n_values} values, expected {length}: the site and the server disagree on "
            "the model (architecture, or which layers are encrypted)."
        )
    per = 2 * eng.slots
    expected_n = -(-length // per)
    if n != expected_n:
        raise HEError(f"{what} carries {n} ciphertexts; {length} values need exactly {expected_n} ({per} per ciphertext).")
    if not (math.isfinite(count) and count > 0):
        raise HEError(f"{what} declares an invalid sample count {count!r} (must be finite and > 0).")
    limit = capacity(eng.params)
    if not (math.isfinite(bound) and 0 <= bound <= limit):
        raise HEError(
            f"{what} declares the value bound {bound!r}, outside [0, capacity {limit:.10g}] of {eng.params.describe()}."
        )
    if n_sites < 1 or (kind == "update" and n_sites != 1):
        raise HEError(f"{what} declares {n_sites} contributing sites; an {kind} needs {'1' if kind == 'update' else '>= 1'}.")

    for i, blob in enumerate(frame.blobs):
        _check_seal_header(blob, f"ciphertext #{i} of {what}")
    info = PayloadInfo(got_kind, int(n_values), float(count), float(bound), int(n_sites), int(n), frame.nbytes,
                       frame.digest)
    return info, frame.blobs


def _load(eng: SealEngine, blob: memoryview, what: str) -> sa.Ciphertext:
    """Parse one ciphertext with SEAL's own checks, and refuse any not at the last level and the scale."""
    ct = eng.load_ciphertext(blob, what)
    if ct.parms_id() != eng.context.last_parms_id() or ct.size() != 2 or ct.scale != eng.scale:
        raise HEError(
            f"{what} is at the wrong level or scale (size {ct.size()}, scale 2^{math.log2(max(ct.scale, 1e-300)):.2f});"
            f" expected a fresh encryption at the last level, scale 2^{eng.params.scale_bits}."
        )
    return ct


# ----------------------------------------------------------------------------- site side

_ENCRYPTORS: weakref.WeakKeyDictionary[SealEngine, sa.Encryptor] = weakref.WeakKeyDictionary()
_ENCRYPTORS_LOCK = threading.Lock()


def _encryptor(eng: SealEngine) -> sa.Encryptor:
    with _ENCRYPTORS_LOCK:
        enc = _ENCRYPTORS.get(eng)
        if enc is None:
            enc = _ENCRYPTORS[eng] = sa.Encryptor(eng.context, eng.secret_key)
        return enc


def encrypt_update(
    secret_ctx: ts.Context, values: np.ndarray, count: float, *, value_bound: float = DEFAULT_VALUE_BOUND
) -> bytes:
    """A site's update: ``count * values`` in ceil(len / N) seeded ciphertexts, in the checked wire format.

    ``values`` is the flat update (1-D, real, finite, |values| <= ``value_bound``);
    ``count`` (> 0) is the site's weight, usually its number of training
    samples. ``value_bound`` is a public constant of the configuration (it is
    written to the payload as ``count * value_bound``), never derived from the
    data; ``count * value_bound`` must not exceed :func:`capacity`.
    """
    eng = engine_for(secret_ctx)
    if not eng.private or eng.secret_key is None:
        raise HEError(
            "encrypt_update needs a site's secret context (create_secret_context / load_secret_context); the "
            "server's public context cannot encrypt updates."
        )
    arr = _checked_values(values)
    count = _checked_positive(count, "count")
    value_bound = _checked_positive(value_bound, "value_bound")
    limit = capacity(eng.params)
    magnitude = count * value_bound
    if magnitude > limit:
        raise HEError(
            f"count * value_bound = {count:g} * {value_bound:g} = {magnitude:.6g} exceeds the capacity {limit:.10g} "
            f"of {eng.params.describe()}: |count * value| must stay below it or the encrypted sum wraps around and "
            "decrypts to garbage. Send the count in coarser units (only the counts' ratios matter, e.g. "
            "count / 1000), lower value_bound (clip the update), or use parameters with more bits above the scale."
        )
    peak_at = int(np.abs(arr).argmax())
    if abs(arr[peak_at]) > value_bound:
        raise HEError(
            f"values[{peak_at}] = {arr[peak_at]:.6g} exceeds value_bound {value_bound:g}: count * values could "
            f"overflow the capacity {limit:.10g} of the encrypted sum. Clip the update (e.g. np.clip / "
            "torch.clamp or gradient clipping) or pass a larger value_bound (count * value_bound <= capacity)."
        )

    per, half = 2 * eng.slots, eng.slots
    n = -(-arr.size // per)
    padded = np.zeros(n * per, dtype=np.float64)
    padded[: arr.size] = arr  # to float64 first: count * a float32 value must not round to float32
    padded[: arr.size] *= count
    padded = padded.reshape(n, 2, half)
    level = eng.context.last_parms_id()
    encryptor = _encryptor(eng)
    pt = sa.Plaintext()
    cts = []
    for i in range(n):
        eng.encoder.encode((padded[i, 0] + 1j * padded[i, 1]).tolist(), level, eng.scale, pt)
        cts.append(eng.save(encryptor.encrypt_symmetric(pt)))
    return _pack(eng, "update", arr.size, count, magnitude, 1, cts)


# ----------------------------------------------------------------------------- server side


def check_payload(public_ctx: ts.Context, payload: bytes, length: int) -> PayloadInfo:
    """Check one site's update completely, without summing it; HEError saying what is wrong.

    Everything :class:`EncryptedSum` checks: header, digest, context, length,
    ciphertext count, count and bound, and every ciphertext through SEAL (valid
    for the context, fresh, at the last level and the scale). A payload that
    passes is accepted by :func:`sum_encrypted` (unless the sum as a whole
    would exceed the capacity).
    """
    return load_update(public_ctx, payload, length)[0]


def load_update(public_ctx: ts.Context, payload: bytes, length: int) -> tuple[PayloadInfo, list[sa.Ciphertext]]:
    """One site's update, checked as :func:`check_payload` does, and its SEAL ciphertexts (what a server holds)."""
    eng = engine_for(public_ctx)
    info, blobs = _parse(eng, payload, _checked_length(length), "update", "Encrypted update")
    return info, [_load(eng, blob, f"ciphertext #{i} of the encrypted update") for i, blob in enumerate(blobs)]


class EncryptedSum:
    """The server's running sum of site updates for one round (public context only).

    :meth:`add` checks a payload completely and adds it, or raises HEError and
    leaves the sum as it was, so a bad, duplicated or overflowing site is
    refused and the round continues with the others. Memory: one expanded
    ciphertext per N values (16 bytes per value), whatever the number of
    sites.
    """

    def __init__(self, public_ctx: ts.Context, length: int) -> None:
        self._eng = engine_for(public_ctx)
        self.length = _checked_length(length)
        self.count = 0.0
        self.bound = 0.0
        self.n_sites = 0
        self._acc: list[sa.Ciphertext] | None = None
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def add(self, payload: bytes) -> PayloadInfo:
        """Check and add one site's update; HEError (sum unchanged) if it is refused."""
        eng = self._eng
        info, blobs = _parse(eng, payload, self.length, "update", "Encrypted update")
        with self._lock:
            if info.digest in self._seen:
                raise HEError("Encrypted update was already added to this sum (the same bytes twice: a replay?).")
            limit = capacity(eng.params)
            if self.bound + info.bound > limit:
                raise HEError(
                    f"Adding this update (declared bound count * value_bound = {info.bound:.6g}) would take the sum's "
                    f"bound to {self.bound + info.bound:.6g} > capacity {limit:.10g} of {eng.params.describe()}: the "
                    "encrypted sum could wrap around. Have the sites send counts in coarser units (e.g. count / "
                    "1000) or a smaller value_bound, or use parameters with more bits above the scale."
                )
            if self._acc is None:
                self._acc = [_load(eng, b, f"ciphertext #{i} of the encrypted update") for i, b in enumerate(blobs)]
            else:
                self._add_all(blobs)
            self.count += info.count
            self.bound += info.bound
            self.n_sites += 1
            self._seen.add(info.digest)
        return info

    def _add_all(self, blobs: list[memoryview]) -> None:
        """acc[i] += ct[i] for all i, or (on any error) restore acc and raise HEError."""
        eng, acc = self._eng, self._acc
        assert acc is not None
        done = 0
        try:
            for i, blob in enumerate(blobs):
                what = f"ciphertext #{i} of the encrypted update"
                ct = _load(eng, blob, what)
                out = sa.Ciphertext()
                try:
                    eng.evaluator.add(acc[i], ct, out)  # out of place: acc[i] is untouched if SEAL refuses
                except (RuntimeError, ValueError) as e:
                    raise HEError(f"SEAL refused to add {what} ({e}).") from e
                acc[i] = out
                done = i + 1
        except BaseException:
            for j in range(done):  # the same bytes loaded fine a moment ago
                eng.evaluator.sub_inplace(acc[j], _load(eng, blobs[j], "rollback"))
            raise

    def to_bytes(self) -> bytes:
        """The aggregate payload (kind ``aggregate``) for the key holders."""
        with self._lock:
            if self._acc is None:
                raise HEError("No update was added to this sum; nothing to aggregate (did every site fail?).")
            cts = [self._eng.save(ct) for ct in self._acc]
            return _pack(self._eng, "aggregate", self.length, self.count, self.bound, self.n_sites, cts)


def sum_encrypted(public_ctx: ts.Context, payloads: Sequence[bytes], length: int) -> bytes:
    """Server side: check and add the sites' updates; the aggregate payload with the summed count.

    Raises HEError naming the first bad payload; to drop bad sites instead,
    check them with :func:`check_payload` first, or add them one by one to an
    :class:`EncryptedSum`, which refuses a bad payload and keeps the others.
    """
    if len(payloads) == 0:
        raise HEError("sum_encrypted: no payloads; at least one site must contribute.")
    total = EncryptedSum(public_ctx, length)
    for k, payload in enumerate(payloads):
        try:
            total.add(payload)
        except HEError as e:
            raise HEError(f"payload #{k}: {e}") from e
    return total.to_bytes()


# ----------------------------------------------------------------------------- key holders


def decrypt_aggregate(secret_ctx: ts.Context, payload: bytes, length: int) -> tuple[np.ndarray, float]:
    """Key holders: (weighted mean sum_k n_k x_k / sum_k n_k as float64, total count sum_k n_k).

    Refuses a single site's update (only sums are decrypted) and a public
    context. The decrypted sum must lie within the sites' declared bound and
    the padding after ``length`` must decrypt to zero, up to
    :func:`error_bound`; otherwise a site sent values beyond its declared bound
    or packed them wrongly, and HEError says so.
    """
    eng = engine_for(secret_ctx)
    if not eng.private:
        raise HEError(
            "decrypt_aggregate needs a key holder's secret context; the server's public context cannot decrypt "
            "(by design: it holds no secret key)."
        )
    info, blobs = _parse(eng, payload, _checked_length(length), "aggregate", "Encrypted aggregate")
    half = eng.slots
    out = np.empty((info.n_ciphertexts, 2, half), dtype=np.float64)
    for i, blob in enumerate(blobs):
        z = eng.decrypt(_load(eng, blob, f"ciphertext #{i} of the encrypted aggregate"))
        out[i, 0] = z.real
        out[i, 1] = z.imag
    flat = out.reshape(-1)
    tol = error_bound(eng.params, info.n_sites, info.bound)
    total, padding = flat[:length], flat[length:]
    peak = float(np.abs(total).max())
    if not peak <= info.bound * (1 + 1e-12) + tol:
        raise HEError(
            f"The decrypted sum holds |values| up to {peak:.6g} > the sites' declared bound {info.bound:.6g}: a site "
            "sent values beyond its declared count * value_bound (or the sum overflowed); the aggregate is unusable."
        )
    if padding.size and not float(np.abs(padding).max()) <= tol:
        raise HEError(
            "The decrypted sum has non-zero padding after the last value: a site packed an update of another "
            "length or layout; the aggregate is unusable."
        )
    return total / info.count, info.count


# ----------------------------------------------------------------------------- input checks


def _checked_length(length: object) -> int:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise HEError(f"length={length!r} must be a positive integer (the number of values in an update).")
    return int(length)


def _checked_positive(value: object, name: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HEError(f"{name}={value!r} must be a number.") from None
    if not (math.isfinite(v) and v > 0):
        raise HEError(f"{name}={value!r} must be finite and > 0.")
    return v


def _checked_values(values: object) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(values)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise HEError(f"values must be a real numeric array, got dtype {arr.dtype}.")
    if arr.ndim != 1 or arr.size == 0:
        raise HEError(f"values must be a non-empty 1-D array (flatten the update), got shape {arr.shape}.")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise HEError(
            f"values has {int(bad.sum())} non-finite value(s), first values[{i}] = {arr[i]}; CKKS cannot encrypt "
            "NaN/inf. Check the local training (e.g. lower the learning rate)."
        )
    return arr
