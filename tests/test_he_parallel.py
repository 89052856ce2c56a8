"""CKKS worker processes: the same results as one process, checked against torch, and the same refusals.

Reference: plaintext torch (x @ W.T + b, G @ W, plaintext SGD) within the presets' CKKS tolerance (1e-6).
Each pool holds one party's context: the hospital's secret one, the server's public one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitfl.he.encrypted_head import FullHeadHospital, FullHeadLayout
from splitfl.he.keys import create_secret_context, engine_for, load_public_context, public_context_bytes
from splitfl.he.linear import PackedLinearHE
from splitfl.he.parallel import CKKSWorkers, resolve_workers
from splitfl.he.params import PRESETS, HEError
from splitfl.he.wire import EncryptedBatch

TOL = 1e-6


@pytest.fixture(scope="module")
def parties():
    ctx = create_secret_context(PRESETS["small"])
    pub = load_public_context(public_context_bytes(ctx))
    with CKKSWorkers(ctx, 2) as hospital, CKKSWorkers(pub, 2) as server:
        yield ctx, pub, hospital, server


def test_split_he_round_trip_with_workers_equals_torch(parties):
    ctx, pub, hospital, server = parties
    head = PackedLinearHE(40, 5, 16, PRESETS["small"].slots)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(13, 40, generator=g), torch.randn(5, 40, generator=g) * 0.1, torch.randn(5, generator=g)
    grad = torch.randn(13, 5, generator=g) * 0.1
    up = head.encrypt_activations(ctx, x, hospital).to_bytes()
    reply = head.forward(EncryptedBatch.from_bytes(pub, up), w, b, server).to_bytes()
    logits = head.decrypt_logits(ctx, EncryptedBatch.from_bytes(ctx, reply), dtype=torch.float64, workers=hospital)
    assert torch.allclose(logits, x.double() @ w.double().T + b.double(), atol=1e-3)  # small preset: ~1e-4
    g_up = head.encrypt_logit_grads(ctx, grad, hospital).to_bytes()
    back = head.backward_input(EncryptedBatch.from_bytes(pub, g_up), w, server).to_bytes()
    dx = head.decrypt_activation_grads(ctx, EncryptedBatch.from_bytes(ctx, back), dtype=torch.float64, workers=hospital)
    assert torch.allclose(dx, grad.double() @ w.double(), atol=1e-3)
    # the same messages computed in one process decrypt to the same values
    one = head.decrypt_logits(ctx, EncryptedBatch.from_bytes(ctx, head.forward(EncryptedBatch.from_bytes(pub, up), w, b)
                                                             .to_bytes()), dtype=torch.float64)
    assert torch.allclose(one, logits, atol=1e-3)


def test_workers_refuse_bad_ciphertexts_and_another_context(parties):
    ctx, pub, hospital, server = parties
    head = PackedLinearHE(8, 3, 4, PRESETS["small"].slots)
    enc = EncryptedBatch.from_bytes(pub, head.encrypt_activations(ctx, torch.zeros(4, 8)).to_bytes())
    enc.payloads[0] = b"\x00" * 64  # a corrupted ciphertext: refused in the worker, raised here
    with pytest.raises(HEError, match="not a valid ciphertext"):
        head.forward(enc, torch.zeros(3, 8), torch.zeros(3), server)
    other = create_secret_context(PRESETS["small"])
    with pytest.raises(HEError, match="another context"):
        head.encrypt_activations(other, torch.zeros(4, 8), hospital)
    with pytest.raises(HEError, match="at least two"):
        CKKSWorkers(ctx, 1)
    assert resolve_workers(0) >= 1 and resolve_workers(3) == 3
    with pytest.raises(HEError, match="workers=-1"):
        resolve_workers(-1)


def test_full_head_hospital_with_workers_encrypts_what_one_process_does():
    ctx = create_secret_context(PRESETS["full"])
    layout = FullHeadLayout(20, 3, 8, engine_for(ctx).slots)
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(8, 20, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    with CKKSWorkers(ctx, 2) as pool:
        hospital = FullHeadHospital(ctx, layout, pool)
        update = hospital.encrypt_update(grad, x, 0.1)
        assert len(update) == layout.pairs * layout.n_blocks
        slots = np.stack([engine_for(ctx).decrypt(engine_for(ctx).load_ciphertext(c, "u")) for c in update])
        w, b = layout.unpack_weights(slots.reshape(layout.pairs, layout.n_blocks, -1))
        expected = 0.1 * grad.T @ torch.cat([x, torch.ones(8, 1, dtype=torch.float64)], dim=1)
        assert np.allclose(w, expected[:, :-1].numpy(), atol=TOL) and np.allclose(b, expected[:, -1].numpy(), atol=TOL)
        assert np.allclose(hospital._decrypt(update, "update"), slots, atol=1e-12)  # decrypted by the workers too
