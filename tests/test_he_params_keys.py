"""CKKS parameter checks and consortium key handling (splitfl.he.params, splitfl.he.keys)."""
from __future__ import annotations

import os
import stat

import pytest
import tenseal as ts
import torch

from splitfl.he import (
    PRESETS,
    CKKSParams,
    EncryptedBatch,
    HEError,
    PackedLinearHE,
    check_depth,
    check_product_depth,
    check_key_switching,
    check_security,
    context_fingerprint,
    create_secret_context,
    get_preset,
    load_public_context,
    load_secret_context,
    max_abs_value,
    params_of,
    public_context_bytes,
    save_secret_context,
)
from splitfl.he.keys import _proto_fields




# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_secure_and_deep_enough(name: str) -> None:
    params = PRESETS[name]
    check_security(params)
    if name == "full":  # split-he-full: a ciphertext x ciphertext product, rescaled once by a prime above the scale
        check_product_depth(params)
        with pytest.raises(HEError, match="middle prime #1 has 60 bits"):
            check_depth(params, 1)
    else:
        check_depth(params, 1)
    check_key_switching(params)
    assert params.name == name and get_preset(name) is params


def test_deep_preset_holds_an_mlp_head() -> None:
    check_depth(PRESETS["deep"], 3)  # linear -> square -> linear
    with pytest.raises(HEError, match="has 1 rescale level"):
        check_depth(PRESETS["default"], 2)


@pytest.mark.parametrize(
    ("params", "numbers"),
    [
        (CKKSParams(8192, (60, 60, 60, 60), 40), ["240 bits", "at most 218"]),
        (CKKSParams(4096, (40, 40, 40), 40), ["120 bits", "at most 109"]),
        (CKKSParams(1024, (30,) * 2, 20), ["60 bits", "at most 27"]),
    ],
)
def test_check_security_rejects_insecure_sets_naming_the_numbers(params: CKKSParams, numbers: list[str]) -> None:
    with pytest.raises(HEError, match="NOT 128-bit secure") as err:
        check_security(params)
    for text in numbers:
        assert text in str(err.value)


def test_check_security_rejects_degrees_outside_the_table() -> None:
    with pytest.raises(HEError, match="not in the 128-bit security table"):
        check_security(CKKSParams(65536, (60, 60), 40))


def test_check_depth_explains_scale_and_headroom_problems() -> None:
    with pytest.raises(HEError, match=r"middle prime #1 has 30 bits but scale_bits=40"):
        check_depth(CKKSParams(8192, (60, 30, 60), 40), 1)
    with pytest.raises(HEError, match=r"only 5 integer bit\(s\)"):
        check_depth(CKKSParams(8192, (45, 40, 60), 40), 1)
    with pytest.raises(HEError, match="needs 1"):
        check_depth(CKKSParams(8192, (60, 60), 40), 1)  # no middle prime: no rescale possible
    with pytest.raises(HEError, match="below 2"):
        check_depth(CKKSParams(2048, (30, 15, 30), 15), 1)


def test_max_abs_value_is_the_tightest_step_of_the_evaluation() -> None:
    # default: the product at 2^80 over 100 bits and the rescaled result at 2^40 over 60 bits both leave 19 bits
    assert max_abs_value(PRESETS["default"]) == 2.0**18
    assert max_abs_value(PRESETS["small"]) == 2.0**9
    # deeper chain, depth 1: 220 data bits hold the product at 2^80 with 140 bits to spare
    assert max_abs_value(PRESETS["deep"], 1) == 2.0**138
    assert max_abs_value(PRESETS["deep"], 4) == 2.0**18


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(poly_modulus_degree=6000, coeff_mod_bit_sizes=(60, 40, 60), scale_bits=40),
        dict(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60,), scale_bits=40),
        dict(poly_modulus_degree=8192, coeff_mod_bit_sizes=(70, 40, 60), scale_bits=40),
        dict(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 60), scale_bits=0),
    ],
)
def test_ckks_params_validate_their_fields(kwargs: dict) -> None:
    with pytest.raises(HEError):
        CKKSParams(**kwargs)


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(HEError, match="default"):
        get_preset("fastest")


def test_key_switching_needs_the_largest_prime_last() -> None:
    with pytest.raises(HEError, match="special"):
        check_key_switching(CKKSParams(8192, (60, 40, 40), 40))
    with pytest.raises(HEError, match="special"):
        create_secret_context(CKKSParams(8192, (60, 40, 40), 40), galois=True)


def test_insecure_params_cannot_make_a_context() -> None:
    with pytest.raises(HEError, match="NOT 128-bit secure"):
        create_secret_context(CKKSParams(4096, (60, 40, 60), 40))


# ---------------------------------------------------------------- keys


def test_server_context_has_no_secret_key(ctx: ts.Context, pub: ts.Context) -> None:
    assert ctx.is_private() and not pub.is_private()
    # the public context can encrypt (public key) but not decrypt
    vec = ts.ckks_vector(pub, [1.0, 2.0])
    with pytest.raises(ValueError):
        vec.decrypt()
    # ... and the packed head refuses to encrypt or decrypt with it
    head = PackedLinearHE(8, 2, 4, PRESETS["default"].slots)
    with pytest.raises(HEError, match="secret context"):
        head.encrypt_activations(pub, torch.zeros(4, 8))
    enc_x = EncryptedBatch.from_bytes(pub, head.encrypt_activations(ctx, torch.ones(4, 8)).to_bytes())
    logits = head.forward(enc_x, torch.ones(2, 8), torch.zeros(2))
    with pytest.raises(HEError, match="secret context"):
        head.decrypt_logits(pub, logits)
    assert head.decrypt_logits(ctx, logits).sub(8.0).abs().max() < 1e-5


def test_public_bytes_carry_neither_the_secret_key_nor_unneeded_evaluation_keys(ctx: ts.Context) -> None:
    data = public_context_bytes(ctx)
    secret_key = _proto_fields(_proto_fields(ctx.serialize(save_secret_key=True), "ctx")[3][0], "private")[1][0]
    assert len(secret_key) > 1000 and secret_key not in data
    assert 3 not in _proto_fields(data, "pub")  # no private_context at all
    public_part = _proto_fields(_proto_fields(data, "pub")[2][0], "public")
    assert 4 not in public_part and 5 not in public_part  # no relin / Galois keys: a linear head needs none
    assert len(public_context_bytes(ctx, relin=True)) > 2 * len(data)
    with pytest.raises(HEError, match="no Galois keys"):
        public_context_bytes(ctx, galois=True)


def test_load_public_context_refuses_a_secret_context(ctx: ts.Context) -> None:
    with pytest.raises(HEError, match="SECRET key"):
        load_public_context(ctx.serialize(save_secret_key=True))
    with pytest.raises(HEError, match="not a valid TenSEAL context"):
        load_public_context(b"\x0a\x03abc")


def test_fingerprint_covers_parameters_and_public_key(ctx: ts.Context, pub: ts.Context) -> None:
    fp = context_fingerprint(ctx)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert context_fingerprint(pub) == fp  # the server's copy matches
    assert context_fingerprint(load_public_context(public_context_bytes(ctx, relin=True))) == fp
    other_key = create_secret_context(PRESETS["default"])
    assert context_fingerprint(other_key) != fp
    assert context_fingerprint(create_secret_context(PRESETS["small"])) != fp
    assert params_of(pub) == PRESETS["default"]


def test_ciphertext_under_key_a_fails_the_fingerprint_check_under_key_b(ctx: ts.Context) -> None:
    head = PackedLinearHE(16, 3, 8, PRESETS["default"].slots)
    data = head.encrypt_activations(ctx, torch.randn(8, 16)).to_bytes()
    pub_b = load_public_context(public_context_bytes(create_secret_context(PRESETS["default"])))
    with pytest.raises(HEError, match="another consortium key or parameter set"):
        EncryptedBatch.from_bytes(pub_b, data)
    # the same bytes are accepted by the server of key A
    EncryptedBatch.from_bytes(load_public_context(public_context_bytes(ctx)), data, expect_kind="activations")


def test_secret_context_file_is_private_atomic_and_round_trips(ctx: ts.Context, tmp_path) -> None:
    path = save_secret_context(ctx, tmp_path / "keys" / "consortium.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["consortium.key"]  # no temp file left behind
    loaded = load_secret_context(path)
    assert loaded.is_private() and context_fingerprint(loaded) == context_fingerprint(ctx)
    head = PackedLinearHE(16, 3, 8, PRESETS["default"].slots)
    x = torch.randn(8, 16)
    enc = head.forward(head.encrypt_activations(ctx, x), torch.eye(3, 16), torch.zeros(3))
    assert torch.allclose(head.decrypt_logits(loaded, enc), x[:, :3], atol=1e-5)


def test_load_secret_context_errors(ctx: ts.Context, tmp_path) -> None:
    public_file = tmp_path / "public.key"
    public_file.write_bytes(b"SPLITFL-CKKS-SECRET-CONTEXT v1\n" + public_context_bytes(ctx))
    with pytest.raises(HEError, match="holds no secret key"):
        load_secret_context(public_file)
    other = tmp_path / "other.bin"
    other.write_bytes(public_context_bytes(ctx))
    with pytest.raises(HEError, match="not a splitfl secret context"):
        load_secret_context(other)
    with pytest.raises(HEError, match="Cannot read"):
        load_secret_context(tmp_path / "missing.key")
    pub = load_public_context(public_context_bytes(ctx))
    with pytest.raises(HEError, match="no secret key"):
        save_secret_context(pub, tmp_path / "x.key")
    assert not (tmp_path / "x.key").exists()
