"""Encrypted FedAvg aggregation (splitfl.he.aggregation): weighted means, key separation, refused payloads.

Tolerance: the decrypted weighted sum is off by at most ``error_bound`` (8
standard deviations of the CKKS encryption noise and encoding rounding,
sqrt(K * N/2 * 10.6) / 2^36 each: ~5e-8 for 4 sites of the ``aggregation``
preset, plus float64 rounding), and the mean by that divided by the total
count (>= 1 here). TOL = 1e-6 is 8 times the bound for 16 sites summing to the
full capacity, so a pass is not luck, and the correctness tests also check the
actual error against the bound itself.
"""
from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest

from splitfl.he import (
    PRESETS,
    HEError,
    check_security,
    create_secret_context,
    load_public_context,
    public_context_bytes,
)
from splitfl.he.aggregation import (
    EncryptedSum,
    capacity,
    check_payload,
    decrypt_aggregate,
    encrypt_update,
    error_bound,
    n_ciphertexts,
    sum_encrypted,
    values_per_ciphertext,
)
from splitfl.he.keys import _proto_fields, engine_for

PARAMS = PRESETS["aggregation"]
PER = PARAMS.poly_modulus_degree  # values per ciphertext: two per complex slot
CAP = capacity(PARAMS)
TOL = 1e-6
_HEAD = struct.Struct("<4sHBB32sQddII")


@pytest.fixture(scope="module")
def site_ctx():
    """The consortium's secret context, as every site holds it."""
    return create_secret_context(PARAMS)


@pytest.fixture(scope="module")
def server_ctx(site_ctx):
    """The server's view: public context only."""
    return load_public_context(public_context_bytes(site_ctx))


@pytest.fixture(scope="module")
def update(site_ctx) -> tuple[np.ndarray, bytes]:
    """One site's update of 2 ciphertexts and a partial third (length not a multiple of N)."""
    x = np.random.default_rng(1).uniform(-1, 1, 2 * PER + 77)
    return x, encrypt_update(site_ctx, x, 12.0)


def _sites(n: int, length: int, seed: int) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    values = [rng.uniform(-1, 1, length).astype(np.float32) for _ in range(n)]
    counts = [1.0, 250.5, 1e5, 37.0, 3.0][:n]
    return values, counts


def _weighted_mean(values: list[np.ndarray], counts: list[float]) -> np.ndarray:
    return sum(n * v.astype(np.float64) for v, n in zip(values, counts)) / sum(counts)


def _reseal(payload: bytes, blob_edit=None, **fields) -> bytes:
    """Rewrite header fields (by name) and/or one ciphertext, then recompute the digest: well-formed, wrong content."""
    names = ("magic", "version", "kind", "reserved", "fp", "length", "count", "bound", "sites", "n")
    head = dict(zip(names, _HEAD.unpack_from(payload, 0)))
    n = head["n"]
    sizes = list(struct.unpack_from(f"<{n}I", payload, _HEAD.size))
    body_start = _HEAD.size + 4 * n + 32
    blobs, off = [], body_start
    for size in sizes:
        blobs.append(payload[off : off + size])
        off += size
    if blob_edit is not None:
        i, edit = blob_edit
        blobs[i] = edit(blobs[i])
    head.update(fields)
    new_head = _HEAD.pack(*(head[k] for k in names)) + struct.pack(f"<{n}I", *(len(b) for b in blobs))
    digest = hashlib.sha256(new_head)
    for b in blobs:
        digest.update(b)
    return new_head + digest.digest() + b"".join(blobs)


def _corrupt_coefficients(blob: bytes) -> bytes:
    """Set 16 bytes mid-ciphertext to 0xFF: coefficients >= the 60-bit prime (or a broken frame)."""
    mid = len(blob) // 2
    return blob[:mid] + b"\xff" * 16 + blob[mid + 16 :]


# ------------------------------------------------------------------------------------------- parameters


def test_preset_is_secure_depth0_and_sized_for_fedavg() -> None:
    check_security(PARAMS)
    assert PARAMS.coeff_mod_bit_sizes[0] == 60 and PARAMS.scale_bits == 36
    assert CAP == 2.0**21 >= 10 * 1e5 * 1.0  # 10 sites x 1e5 samples x |delta| <= 1
    assert error_bound(PARAMS, 16, CAP) <= TOL / 8  # the tolerance follows from the scale
    assert values_per_ciphertext(create_secret_context(PARAMS)) == PER


def test_update_uses_full_slots_and_seeded_ciphertexts(update) -> None:
    x, payload = update
    assert n_ciphertexts(create_secret_context(PARAMS), x.size) == 3 == math.ceil(x.size / PER)
    # Seeded symmetric ciphertexts at the last level: one 60-bit polynomial + a seed, ~8 bytes per slot value.
    assert len(payload) / (3 * PER) < 8.1


# ------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "n_sites, length",
    [(1, 1), (1, PER), (3, 2 * PER + 123), (5, 1000)],
    ids=["1 site, 1 value", "1 site, exactly N", "3 sites, 2N+123", "5 sites, 1000"],
)
def test_encrypted_weighted_mean_equals_plaintext(site_ctx, server_ctx, n_sites, length) -> None:
    values, counts = _sites(n_sites, length, seed=n_sites)
    payloads = [encrypt_update(site_ctx, v, n) for v, n in zip(values, counts)]
    for p in payloads:
        info = check_payload(server_ctx, p, length)
        assert info.kind == "update" and info.n_ciphertexts == math.ceil(length / PER)
    aggregate = sum_encrypted(server_ctx, payloads, length)
    mean, total = decrypt_aggregate(site_ctx, aggregate, length)
    assert total == pytest.approx(sum(counts), rel=1e-15)
    assert mean.shape == (length,) and mean.dtype == np.float64
    err = float(np.abs(mean - _weighted_mean(values, counts)).max())
    assert err <= error_bound(PARAMS, n_sites, sum(counts)) / sum(counts)
    assert err <= TOL


@pytest.mark.parametrize("pattern", ["constant", "random signs"])
def test_values_at_the_capacity_do_not_wrap(site_ctx, server_ctx, pattern) -> None:
    """Two sites of count capacity/2 with |values| = value_bound = 1: the sum sits exactly at the capacity."""
    rng = np.random.default_rng(0)
    length = PER + 10
    values = [np.ones(length), np.ones(length)] if pattern == "constant" else [
        rng.choice([-1.0, 1.0], length) for _ in range(2)
    ]
    payloads = [encrypt_update(site_ctx, v, CAP / 2) for v in values]
    mean, total = decrypt_aggregate(site_ctx, sum_encrypted(server_ctx, payloads, length), length)
    assert total == CAP
    assert np.abs(mean - (values[0] + values[1]) / 2).max() <= TOL


# ------------------------------------------------------------------------------------------- key separation


def test_server_context_holds_no_secret_key_and_cannot_decrypt(site_ctx, server_ctx, update) -> None:
    x, payload = update
    assert site_ctx.is_private() and not server_ctx.is_private()
    assert 3 not in _proto_fields(public_context_bytes(site_ctx), "public context")  # no private_context field
    assert engine_for(server_ctx).secret_key is None
    with pytest.raises(ValueError):
        server_ctx.secret_key()
    aggregate = sum_encrypted(server_ctx, [payload], x.size)
    with pytest.raises(HEError, match="secret context"):
        decrypt_aggregate(server_ctx, aggregate, x.size)
    with pytest.raises(HEError, match="secret context"):
        encrypt_update(server_ctx, x, 1.0)


def test_a_single_update_is_never_decrypted(site_ctx, server_ctx, update) -> None:
    x, payload = update
    with pytest.raises(HEError, match="secret context"):  # the server: no key at all
        decrypt_aggregate(server_ctx, payload, x.size)
    with pytest.raises(HEError, match="expected an encrypted aggregate"):  # not even through the API by a key holder
        decrypt_aggregate(site_ctx, payload, x.size)
    # And SEAL itself has nothing to decrypt with on the server.
    eng = engine_for(server_ctx)
    first = _HEAD.size + 4 * 3 + 32
    size = struct.unpack_from("<I", payload, _HEAD.size)[0]
    ct = eng.load_ciphertext(payload[first : first + size], "ciphertext #0")
    with pytest.raises(HEError, match="secret context"):
        eng.decrypt(ct)


# ------------------------------------------------------------------------------------------- refused payloads


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p[:-1], "truncated"),
        (lambda p: p[:50], "truncated"),
        (lambda p: p + b"\0", "trailing bytes"),
        (lambda p: p[:-10] + bytes([p[-10] ^ 1]) + p[-9:], "checksum mismatch"),
        (lambda p: b"XXXX" + p[4:], "not a splitfl"),
        (lambda p: _reseal(p, version=2), "format version 2"),
        (lambda p: _reseal(p, kind=2), "expected an encrypted update"),
        (lambda p: _reseal(p, kind=7), "unknown payload kind"),
        (lambda p: _reseal(p, length=2 * PER + 78), "holds a vector of"),
        (lambda p: _reseal(p, count=-3.0), "invalid sample count"),
        (lambda p: _reseal(p, count=float("nan")), "invalid sample count"),
        (lambda p: _reseal(p, bound=4 * CAP), "value bound"),
        (lambda p: _reseal(p, sites=2), "contributing sites"),
        (lambda p: _reseal(p, blob_edit=(1, lambda b: b"\0\0" + b[2:])), "not a SEAL-serialised object"),
        (lambda p: _reseal(p, blob_edit=(2, _corrupt_coefficients)), "not a valid ciphertext"),
    ],
    ids=[
        "truncated by one byte",
        "truncated header",
        "trailing byte",
        "flipped bit",
        "bad magic",
        "version",
        "kind aggregate",
        "kind unknown",
        "declared length",
        "negative count",
        "nan count",
        "bound above capacity",
        "update from 2 sites",
        "SEAL header",
        "ciphertext data",
    ],
)
def test_bad_payloads_are_refused_with_a_clear_error(server_ctx, update, make, message) -> None:
    x, payload = update
    bad = make(payload)
    with pytest.raises(HEError, match=message):
        check_payload(server_ctx, bad, x.size)
    with pytest.raises(HEError, match=rf"payload #1: .*{message}"):
        sum_encrypted(server_ctx, [payload, bad], x.size)


def test_ciphertext_count_must_match_the_length(site_ctx, server_ctx, update) -> None:
    x, _ = update
    shorter = encrypt_update(site_ctx, x[: 2 * PER], 12.0)  # 2 ciphertexts
    forged = _reseal(shorter, length=x.size)  # claims 2N+77 values with 2 ciphertexts
    with pytest.raises(HEError, match="carries 2 ciphertexts; .* need exactly 3"):
        check_payload(server_ctx, forged, x.size)


def test_wrong_context_is_refused(site_ctx, server_ctx, update, ctx) -> None:
    x, _ = update
    other_key = create_secret_context(PARAMS)  # another consortium, same parameters
    for foreign in (encrypt_update(other_key, x, 1.0), encrypt_update(ctx, x[:4096], 1.0)):  # ctx: default preset
        with pytest.raises(HEError, match="another consortium key or parameter set"):
            check_payload(server_ctx, foreign, int(_HEAD.unpack_from(foreign, 0)[5]))
    other_server = load_public_context(public_context_bytes(other_key))
    aggregate = sum_encrypted(other_server, [encrypt_update(other_key, x, 1.0)], x.size)
    with pytest.raises(HEError, match="another consortium key"):  # ... and its aggregate is not ours to decrypt
        decrypt_aggregate(site_ctx, aggregate, x.size)


def test_wrong_length_is_refused(site_ctx, server_ctx, update) -> None:
    x, payload = update
    for length in (x.size - 1, x.size + 1, PER):
        with pytest.raises(HEError, match=f"holds a vector of {x.size} values, expected {length}"):
            check_payload(server_ctx, payload, length)
    aggregate = sum_encrypted(server_ctx, [payload], x.size)
    with pytest.raises(HEError, match="holds a vector of"):
        decrypt_aggregate(site_ctx, aggregate, x.size + 1)
    with pytest.raises(HEError, match="positive integer"):
        check_payload(server_ctx, payload, 0)


# ------------------------------------------------------------------------------------------- overflow and bad input


def test_values_that_would_overflow_are_refused_before_encrypting(site_ctx) -> None:
    x = np.full(10, 0.5)
    with pytest.raises(HEError, match=r"exceeds the capacity 2097152 .* coarser units"):
        encrypt_update(site_ctx, x, 3e6)  # count * value_bound = 3e6 > 2^21
    with pytest.raises(HEError, match=r"exceeds the capacity"):
        encrypt_update(site_ctx, x, 1e5, value_bound=100.0)
    with pytest.raises(HEError, match=r"values\[3\] = 1.5 exceeds value_bound 1"):
        encrypt_update(site_ctx, np.array([0.0, 0.1, -0.2, 1.5]), 10.0)
    encrypt_update(site_ctx, np.array([0.0, 0.1, -0.2, 1.5]), 10.0, value_bound=2.0)  # a larger declared bound fits


@pytest.mark.parametrize(
    "values, count, message",
    [
        (np.array([0.1, np.nan]), 1.0, "non-finite"),
        (np.array([0.1, np.inf]), 1.0, "non-finite"),
        (np.zeros((2, 3)), 1.0, "1-D"),
        (np.zeros(0), 1.0, "non-empty"),
        (np.array([1j]), 1.0, "real numeric"),
        (np.zeros(3), 0.0, "count=0.0 must be finite and > 0"),
        (np.zeros(3), -2, "count=-2 must be finite and > 0"),
        (np.zeros(3), float("inf"), "must be finite"),
    ],
)
def test_bad_updates_are_refused(site_ctx, values, count, message) -> None:
    with pytest.raises(HEError, match=message):
        encrypt_update(site_ctx, values, count)


def test_server_refuses_a_sum_past_the_capacity_and_keeps_the_others(site_ctx, server_ctx) -> None:
    values, _ = _sites(3, 100, seed=7)
    payloads = [encrypt_update(site_ctx, v, 0.45 * CAP) for v in values]
    total = EncryptedSum(server_ctx, 100)
    total.add(payloads[0])
    total.add(payloads[1])
    with pytest.raises(HEError, match="capacity 2097152"):
        total.add(payloads[2])
    mean, count = decrypt_aggregate(site_ctx, total.to_bytes(), 100)
    assert count == 0.9 * CAP and total.n_sites == 2
    assert np.abs(mean - (values[0] + values[1].astype(np.float64)) / 2).max() <= TOL


def test_a_rejected_site_leaves_the_sum_unchanged(site_ctx, server_ctx) -> None:
    """Dropouts and bad sites: the round goes on with whoever is left."""
    length = 2 * PER + 5
    values, counts = _sites(3, length, seed=11)
    good = [encrypt_update(site_ctx, v, n) for v, n in zip(values, counts)]
    # Valid first ciphertext, invalid second: the first is added, then rolled back.
    bad = _reseal(good[2], blob_edit=(1, _corrupt_coefficients))
    total = EncryptedSum(server_ctx, length)
    total.add(good[0])
    with pytest.raises(HEError, match="not a valid ciphertext"):
        total.add(bad)
    with pytest.raises(HEError, match="already added"):
        total.add(good[0])  # a replay
    total.add(good[1])  # site 2 dropped out
    mean, count = decrypt_aggregate(site_ctx, total.to_bytes(), length)
    assert count == counts[0] + counts[1] and total.n_sites == 2
    assert np.abs(mean - _weighted_mean(values[:2], counts[:2])).max() <= TOL
    with pytest.raises(HEError, match="no payloads"):
        sum_encrypted(server_ctx, [], length)
    with pytest.raises(HEError, match="No update was added"):
        EncryptedSum(server_ctx, length).to_bytes()


def test_key_holder_detects_a_site_that_exceeded_its_declared_bound(site_ctx, server_ctx) -> None:
    x = np.full(50, 0.9)
    liar = _reseal(encrypt_update(site_ctx, x, 100.0), bound=1.0)  # declares |count * x| <= 1, sends 90
    aggregate = sum_encrypted(server_ctx, [liar], 50)
    with pytest.raises(HEError, match="declared bound"):
        decrypt_aggregate(site_ctx, aggregate, 50)
