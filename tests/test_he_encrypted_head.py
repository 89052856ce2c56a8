"""split-he-full's encrypted head: SGD on encrypted weights equals plaintext SGD step for step.

Reference: a torch ``nn.Linear`` trained by ``torch.optim.SGD`` on the same batches with autograd's
cross-entropy gradients. Tolerances (``full`` preset): 1e-6 on logits and activation gradients (one
ciphertext x ciphertext product rescaled to 2^40, ~1e-8 per slot, summed over a block's partial products:
~1e-7), 1e-8 on the released weights (each update adds one fresh encryption's noise at 2^50, ~1e-12).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from splitfl.he.encrypted_head import (
    EncryptedLinearHead,
    FullHeadHospital,
    FullHeadLayout,
    full_public_context_bytes,
)
from splitfl.he.keys import create_secret_context, engine_for, load_public_context, public_context_bytes
from splitfl.he.params import PRESETS, HEError, check_security

TOL = 1e-6  # logits and dL/dx
W_TOL = 1e-8  # released weights


@pytest.fixture(scope="module")
def ctx():
    return create_secret_context(PRESETS["full"])


def _parties(ctx, d: int, k: int, b: int, seed: int = 0, refresh_every: int = 1000):
    layout = FullHeadLayout(d, k, b, engine_for(ctx).slots)
    public = load_public_context(full_public_context_bytes(ctx, layout))
    hospital = FullHeadHospital(ctx, layout)
    torch.manual_seed(seed)
    ref = torch.nn.Linear(d, k).double()
    server = EncryptedLinearHead(public, layout, hospital.encrypt_weights(ref.weight, ref.bias), refresh_every)
    return layout, hospital, server, ref


def _backward(hospital, server, g, x, lr, input_grad):
    """One backward message as the transport sends it: enc(lr G) when dL/dx is wanted, then enc(lr dL/dW)."""
    cts = (hospital.encrypt_logit_grads(g) if input_grad else []) + hospital.encrypt_update(g, x, lr)
    return server.backward(cts, input_grad)


def test_full_preset_is_secure_with_one_rescale():
    p = PRESETS["full"]
    check_security(p)
    assert p.levels == 1


def test_layout_round_trips_and_pairs_classes():
    lay = FullHeadLayout(in_features=10, num_classes=3, batch_size=4, slots=32)
    assert lay.features_per_block == 8 and lay.n_blocks == 2 and lay.pairs == 2
    assert lay.backward_count(True) == 6 and lay.backward_count(False) == 4
    rng = np.random.default_rng(0)
    x, w, b, g = rng.normal(size=(3, 10)), rng.normal(size=(3, 10)), rng.normal(size=3), rng.normal(size=(3, 3))
    packed_x = lay.pack_activations(x)
    assert packed_x[0][:8].tolist() == x[0, :8].tolist() and packed_x[1][2] == 1.0  # bias feature of sample 0
    assert np.allclose(lay.unpack_activation_grads(packed_x, 3), x)
    wp = lay.pack_weights(w, b)
    assert wp.shape == (2, 2, 32) and np.allclose(lay.unpack_weights(wp)[0], w) and np.allclose(lay.unpack_weights(wp)[1], b)
    # forward: complex weights carry two classes; partial products summed per sample = x @ W.T + b
    partial = np.stack([(packed_x * wp[p]).sum(axis=0) for p in range(2)])
    assert np.allclose(lay.unpack_logits(partial, 3), x @ w.T + b)
    # input gradient: conj-paired G times the paired weights has G @ W as its real part
    gp = lay.pack_logit_grads(g)
    blocks = np.stack([(gp[:, None] * wp)[:, c].sum(axis=0) for c in range(2)])
    assert np.allclose(lay.unpack_activation_grads(blocks, 3), g @ w)
    # the update in the weights' layout: the same packing as the weights
    assert np.allclose(lay.pack_update(np.concatenate([w, b[:, None]], axis=1)), wp)


def test_encrypted_sgd_matches_torch_step_for_step(ctx):
    d, k, b, lr = 20, 3, 8, 0.5
    _, hospital, server, ref = _parties(ctx, d, k, b)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        x = torch.randn(b, d, generator=gen, dtype=torch.float64)
        y = torch.randint(0, k, (b,), generator=gen)
        logits = hospital.decrypt_logits(server.forward(hospital.encrypt_activations(x)), b)
        x_ref = x.clone().requires_grad_(True)
        ref_logits = ref(x_ref)
        assert torch.allclose(logits, ref_logits.detach(), atol=TOL), f"step {step} logits"
        z = logits.clone().requires_grad_(True)  # the hospital's loss on the decrypted logits
        F.cross_entropy(z, y).backward()
        dx = hospital.decrypt_activation_grads(_backward(hospital, server, z.grad, x, lr, True), b)
        opt.zero_grad()
        F.cross_entropy(ref_logits, y).backward()
        opt.step()
        assert torch.allclose(dx, x_ref.grad, atol=TOL), f"step {step} dL/dx"
        w, bias = hospital.decrypt_weights(server.export_weights())
        assert torch.allclose(w, ref.weight.detach(), atol=W_TOL), f"step {step} weights"
        assert torch.allclose(bias, ref.bias.detach(), atol=W_TOL), f"step {step} bias"
    assert server.updates == 8 and server.refreshes == 0


def test_bench_shape_batch_64_features_512_and_partial_batches(ctx):
    """d=512, K=5, B=64 (the bench's head), with a last batch of 40 padded by zeros."""
    d, k, b, lr = 512, 5, 64, 0.05
    _, hospital, server, ref = _parties(ctx, d, k, b, seed=3)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(2)
    for n in (64, 40):
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        y = torch.randint(0, k, (n,), generator=gen)
        logits = hospital.decrypt_logits(server.forward(hospital.encrypt_activations(x)), n)
        z = logits.clone().requires_grad_(True)
        F.cross_entropy(z, y).backward()
        _backward(hospital, server, z.grad, x, lr, False)
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    w, bias = hospital.decrypt_weights(server.export_weights())
    assert (w - ref.weight.detach()).abs().max() < W_TOL and (bias - ref.bias.detach()).abs().max() < W_TOL


def test_server_holds_no_secret_key_and_cannot_decrypt(ctx):
    _, _, server, _ = _parties(ctx, 4, 2, 2)
    assert not server.has_secret_key()
    with pytest.raises(HEError, match="secret"):
        server.eng.decrypt(server.weights[0][0])


def test_refresh_is_asked_for_and_counted(ctx):
    d, k, b, lr = 6, 2, 4, 0.1
    _, hospital, server, ref = _parties(ctx, d, k, b, refresh_every=3)
    x, g = torch.randn(b, d, dtype=torch.float64), torch.randn(b, k, dtype=torch.float64)
    for _ in range(3):
        assert not server.needs_refresh()
        server.forward(hospital.encrypt_activations(x))
        _backward(hospital, server, g, x, lr, False)
    assert server.needs_refresh()
    w, bias = hospital.decrypt_weights(server.export_weights())  # the key holders' refresh
    server.replace_weights(hospital.encrypt_weights(w, bias))
    assert not server.needs_refresh() and server.refreshes == 1 and server.updates == 3
    w2, b2 = hospital.decrypt_weights(server.export_weights())
    assert torch.allclose(w2, w, atol=1e-9) and torch.allclose(b2, bias, atol=1e-9)
    expected = ref.weight.detach() - 3 * lr * g.T @ x
    assert torch.allclose(w, expected, atol=W_TOL)


def test_bad_input_is_refused_and_the_state_kept(ctx):
    d, k, b = 6, 2, 4
    layout, hospital, server, _ = _parties(ctx, d, k, b)
    x, g = torch.randn(b, d, dtype=torch.float64), torch.randn(b, k, dtype=torch.float64)
    before = server.export_weights()
    update = hospital.encrypt_update(g, x, 0.1)
    with pytest.raises(HEError, match="without a training forward"):
        server.backward(update, input_grad=False)
    with pytest.raises(HEError, match="expected 1 ciphertexts"):
        server.forward(hospital.encrypt_activations(x) * 2)
    server.forward(hospital.encrypt_activations(x))
    with pytest.raises(HEError, match=f"expected {layout.backward_count(True)} ciphertexts"):
        server.backward(update, input_grad=True)  # enc(lr G) missing
    eng = hospital.eng
    off_scale = eng.encrypt(np.zeros(eng.slots, dtype=np.complex128), scale=2.0**30)
    with pytest.raises(HEError, match="scale"):
        server.backward(update[:-1] + [off_scale], input_grad=False)  # the last ciphertext is refused: none applied
    with pytest.raises(HEError, match="not a valid ciphertext"):
        server.backward(update[:-1] + [b"\x00" * 64], input_grad=False)
    assert server.export_weights() == before and server.updates == 0
    with pytest.raises(HEError, match="exceeds the 32 slots"):
        FullHeadLayout(6, 2, 64, 32)
    with pytest.raises(HEError, match="activations of shape"):
        hospital.encrypt_activations(torch.zeros(b, d + 1))
    with pytest.raises(HEError, match="share the batch"):
        hospital.encrypt_update(g, x[:2], 0.1)
    with pytest.raises(HEError, match="relinearisation"):
        EncryptedLinearHead(load_public_context(public_context_bytes(ctx)), layout, before)


def test_batch_of_one(ctx):
    d, k, lr = 5, 2, 0.2
    _, hospital, server, ref = _parties(ctx, d, k, 1)
    x, g = torch.randn(1, d, dtype=torch.float64), torch.randn(1, k, dtype=torch.float64)
    logits = hospital.decrypt_logits(server.forward(hospital.encrypt_activations(x)), 1)
    assert torch.allclose(logits, ref(x).detach(), atol=TOL)
    _backward(hospital, server, g, x, lr, False)
    w, _ = hospital.decrypt_weights(server.export_weights())
    assert torch.allclose(w, ref.weight.detach() - lr * g.T @ x, atol=W_TOL)


def test_updates_add_only_fresh_noise_in_every_copy(ctx):
    """100 updates at batch 8 stay within 1e-8 of plaintext SGD in *every* sample's copy of the weights.

    Each update adds one fresh encryption's noise (~1e-10 per slot), so the error is a random walk; nothing
    is rotated, so no fixed key-switching error builds up with one sign.
    """
    d, k, b, lr = 16, 3, 8, 0.05
    layout, hospital, server, ref = _parties(ctx, d, k, b, seed=4)
    w, bias = ref.weight.detach().clone(), ref.bias.detach().clone()
    gen = torch.Generator().manual_seed(5)
    for _ in range(100):
        x = torch.randn(b, d, generator=gen, dtype=torch.float64)
        g = torch.randn(b, k, generator=gen, dtype=torch.float64) / b
        server.forward(hospital.encrypt_activations(x))
        _backward(hospital, server, g, x, lr, False)
        w, bias = w - lr * g.T @ x, bias - lr * g.sum(0)
    slots = np.stack([hospital._decrypt(row, "weight") for row in server.export_weights()])  # (pairs, blocks, slots)
    expected = layout.pack_weights(w.numpy(), bias.numpy())
    real = layout.pack_activations(np.ones((b, d))) != 0  # the slots that hold a weight (not block padding)
    err = np.abs(slots - expected)[:, real]
    assert err.max() < 1e-8, f"max error {err.max():.2e} after 100 updates"


def test_drift_bench_reports_a_curve():
    """`splitfl bench he-head --full-drift N`: the error after N updates without refresh, checked as it goes."""
    from splitfl.bench.he_head import run_full_drift

    drift = run_full_drift(updates=24, check_every=12)
    errors = [p["max_abs_error"] for p in drift["curve"]]
    assert [p["updates"] for p in drift["curve"]] == [12, 24]
    assert 0 < max(errors) < 1e-8
