"""Encrypted MLP head (PackedMLPHE): accuracy vs torch, key handling, timing.

Tolerance on the logits, 'deep' preset (scale 2^40), |x| <= 4, weights and
biases ~N(0, 0.05^2), |logits| up to ~15:

* default (rotations before the first rescale): max |err| <= TOL = 1e-6
  (measured <= ~2e-8);
* ``rotate_before_rescale=False``: max |err| <= TOL_FAST = 1e-4 (measured <= ~1.2e-5,
  the key-switching noise of 7 rotations amplified by the square).

A layout or reduction bug (samples mixed, a rotation missing, a bias on the
wrong slot) gives errors of order 0.01..10.
"""
from __future__ import annotations

import time

import pytest
import torch

from splitfl.he import (
    PRESETS,
    EncryptedBatch,
    HEError,
    check_depth,
    check_security,
    create_secret_context,
    load_public_context,
    public_context_bytes,
)
from splitfl.he.keys import engine_for
from splitfl.he.mlp import MLP_DEPTH, PackedMLPHE, _eval_keys, mlp_public_context_bytes
from splitfl.models.heads import POLY2_RELU_COEFFS, MLPHead

PARAMS = PRESETS["deep"]
TOL = 1e-6
TOL_FAST = 1e-4
SQUARE = (0.0, 0.0, 1.0)
ACTS = {"square": SQUARE, "poly2": POLY2_RELU_COEFFS}
SHAPES = [(512, 16, 5, 64), (300, 16, 3, 37)]  # (d, hidden, K, B): the second one ragged


@pytest.fixture(scope="module")
def ctx():
    return create_secret_context(PARAMS)


@pytest.fixture(scope="module")
def server_ctx(ctx):
    steps = PackedMLPHE(*SHAPES[0], PARAMS.slots, SQUARE).rotation_steps()
    assert steps == PackedMLPHE(*SHAPES[1], PARAMS.slots, SQUARE).rotation_steps()
    return load_public_context(mlp_public_context_bytes(ctx, steps))


def _torch_head(d, h, k, act, seed):
    torch.manual_seed(seed)
    head = MLPHead(d, h, k, activation=act).double()
    with torch.no_grad():
        for lin in head.linear_layers():
            lin.weight.normal_(0.0, 0.05)
            lin.bias.normal_(0.0, 0.05)
    return head


def _run(ctx, server_ctx, shape, act, seed=0, **kw):
    d, h, k, b = shape
    head = _torch_head(d, h, k, act, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(b, d, generator=g, dtype=torch.float64) * 2 - 1) * 4
    with torch.no_grad():
        ref = head(x)
        manual = head.act(x @ head.fc1.weight.T + head.fc1.bias) @ head.fc2.weight.T + head.fc2.bias
    assert torch.allclose(ref, manual)
    he = PackedMLPHE(d, h, k, b, PARAMS.slots, head.act.coeffs, **kw)
    # hospital -> bytes -> server (public context only) -> bytes -> hospital
    up = EncryptedBatch.from_bytes(server_ctx, he.encrypt_activations(ctx, x).to_bytes(), expect_kind="activations")
    t0 = time.perf_counter()
    reply = he.forward(up, head.fc1.weight, head.fc1.bias, head.fc2.weight, head.fc2.bias)
    elapsed = time.perf_counter() - t0
    down = EncryptedBatch.from_bytes(ctx, reply.to_bytes(), expect_kind="logits", expect_batch=b, expect_dim=k)
    out = he.decrypt_logits(ctx, down, dtype=torch.float64)
    return out, ref, elapsed


def test_deep_preset_fits_the_mlp():
    check_security(PARAMS)
    check_depth(PARAMS, MLP_DEPTH)


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}_h{}_k{}_b{}".format(*s))
def test_encrypted_forward_matches_torch(ctx, server_ctx, shape, act):
    out, ref, elapsed = _run(ctx, server_ctx, shape, act)
    assert out.shape == (shape[3], shape[2])
    err = float((out - ref).abs().max())
    print(f"\nPackedMLPHE {shape} {act}: forward {elapsed:.2f} s, max |err| {err:.2e} (|logits| <= {ref.abs().max():.3g})")
    assert err <= TOL, err
    assert ref.abs().max() > 0.1  # the comparison is not vacuous


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}_h{}_k{}_b{}".format(*s))
def test_encrypted_forward_rotating_after_rescale(ctx, server_ctx, shape):
    out, ref, elapsed = _run(ctx, server_ctx, shape, "square", seed=5, rotate_before_rescale=False)
    err = float((out - ref).abs().max())
    print(f"\nPackedMLPHE {shape} square, rotate after rescale: forward {elapsed:.2f} s, max |err| {err:.2e}")
    assert err <= TOL_FAST, err
    assert ref.abs().max() > 0.1


def test_wrong_weights_are_detected(ctx, server_ctx):
    """Sanity: the tolerance is tight enough to catch a perturbed weight."""
    d, h, k, b = SHAPES[1]
    head = _torch_head(d, h, k, "poly2", 3)
    x = torch.rand(b, d, dtype=torch.float64)
    he = PackedMLPHE(d, h, k, b, PARAMS.slots, head.act.coeffs)
    enc = he.encrypt_activations(ctx, x)
    enc.context = server_ctx
    w1 = head.fc1.weight.detach().clone()
    w1[0, -1] += 0.5  # the last feature of the last (partial) block
    reply = he.forward(enc, w1, head.fc1.bias, head.fc2.weight, head.fc2.bias)
    reply.context = ctx
    with torch.no_grad():
        ref = head(x)
    assert float((he.decrypt_logits(ctx, reply, dtype=torch.float64) - ref).abs().max()) > 10 * TOL


def test_server_context_is_public_with_only_the_needed_galois_keys(ctx, server_ctx):
    assert ctx.is_private()
    assert not server_ctx.is_private()
    assert server_ctx.has_relin_keys() and server_ctx.has_galois_keys()
    he = PackedMLPHE(*SHAPES[0], PARAMS.slots, SQUARE)
    steps = he.rotation_steps()
    assert steps == [he.layout.rows << t for t in range(7)]
    eng = engine_for(server_ctx)
    assert eng.fingerprint == engine_for(ctx).fingerprint
    assert _eval_keys(server_ctx, eng, steps).galois.size() == len(steps)
    enc = he.encrypt_activations(ctx, torch.zeros(3, SHAPES[0][0]))
    with pytest.raises(HEError, match="secret"):
        he.encrypt_activations(server_ctx, torch.zeros(3, SHAPES[0][0]))
    enc.context = server_ctx
    d, h, k, _ = SHAPES[0]
    reply = he.forward(enc, torch.zeros(h, d), torch.ones(h), torch.ones(k, h), torch.zeros(k))
    with pytest.raises(HEError, match="secret"):
        he.decrypt_logits(server_ctx, reply)
    reply.context = ctx
    out = he.decrypt_logits(ctx, reply, dtype=torch.float64)  # act(1) = 1 per unit, 16 units
    assert torch.allclose(out, torch.full((3, k), 16.0, dtype=torch.float64), atol=TOL)


def test_missing_evaluation_keys_give_heerror(ctx):
    d, h, k, b = SHAPES[0]
    he = PackedMLPHE(d, h, k, b, PARAMS.slots, SQUARE)
    weights = (torch.zeros(h, d), torch.zeros(h), torch.zeros(k, h), torch.zeros(k))
    cases = [
        (load_public_context(public_context_bytes(ctx, relin=True)), "no Galois keys"),
        (load_public_context(mlp_public_context_bytes(ctx, [1, 2])), r"lacks Galois keys for rotation step\(s\) \[64"),
    ]
    no_relin = load_public_context(public_context_bytes(ctx))
    if not no_relin.has_relin_keys():  # TenSEAL may always ship relin keys; then only the Galois cases apply
        cases.append((no_relin, "relinearisation"))
    x = torch.rand(b, d)
    for server, message in cases:
        enc = he.encrypt_activations(ctx, x)
        enc.context = server
        with pytest.raises(HEError, match=message):
            he.forward(enc, *weights)


def test_input_checks(ctx):
    he = PackedMLPHE(300, 16, 3, 37, PARAMS.slots, POLY2_RELU_COEFFS)
    with pytest.raises(HEError, match="expected"):
        he.encrypt_activations(ctx, torch.zeros(38, 300))
    with pytest.raises(HEError, match="bound"):
        he.encrypt_activations(ctx, torch.full((2, 300), 100.0))
    with pytest.raises(HEError, match="degree"):
        PackedMLPHE(300, 16, 3, 37, PARAMS.slots, (0.0, 0.0, 0.0, 1.0))
    with pytest.raises(HEError, match="rescale level"):
        PackedMLPHE(300, 16, 3, 37, PRESETS["default"].slots, SQUARE).encrypt_activations(
            create_secret_context(PRESETS["default"]), torch.zeros(2, 300)
        )


def test_narrow_input_uses_fewer_rotations(ctx):
    """d < F: only ceil(log2 d) rotation steps, and no wrap-around of other rows' slots."""
    d, h, k, b = 40, 4, 2, 10
    he = PackedMLPHE(d, h, k, b, PARAMS.slots, POLY2_RELU_COEFFS)
    assert he.layout.features_per_block * he.layout.rows == PARAMS.slots
    steps = he.rotation_steps()
    assert steps == [he.layout.rows << t for t in range(6)]
    server = load_public_context(mlp_public_context_bytes(ctx, steps))
    head = _torch_head(d, h, k, "poly2", 7)
    x = (torch.rand(b, d, dtype=torch.float64) * 2 - 1) * 4
    enc = he.encrypt_activations(ctx, x)
    enc.context = server
    reply = he.forward(enc, head.fc1.weight, head.fc1.bias, head.fc2.weight, head.fc2.bias)
    reply.context = ctx
    with torch.no_grad():
        ref = head(x)
    assert float((he.decrypt_logits(ctx, reply, dtype=torch.float64) - ref).abs().max()) <= TOL
