"""Encrypted linear head (splitfl.he.linear, splitfl.he.packing) against torch.

Tolerance: with the default parameters (N=8192, primes 60/40/60, scale 2^40),
inputs |x| <= 10 and weights |W| <= 0.15, the max abs error of the encrypted
forward (vs torch.nn.functional.linear) and backward (vs autograd) is at most
TOL = 1e-6. Measured over 72 shape/seed combinations: <= 1.6e-7 forward (the
worst case sums 4096 noisy partial products per row, B=1) and <= 1.3e-8 backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitfl.he import (
    PRESETS,
    EncryptedBatch,
    HEError,
    PackedLayout,
    PackedLinearHE,
    create_secret_context,
    load_public_context,
    max_abs_value,
    public_context_bytes,
)

TOL = 1e-6
SLOTS = PRESETS["default"].slots




def _head_weights(d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d, k)
    return (lin.weight.detach() * 3).clamp(-0.15, 0.15), lin.bias.detach()


def _round_trip_forward(head, ctx, pub, x, w, b):
    """Hospital encrypts -> wire -> server forward -> wire -> hospital decrypts (float64)."""
    up = head.encrypt_activations(ctx, x).to_bytes()
    server_in = EncryptedBatch.from_bytes(pub, up, expect_kind="activations", expect_dim=head.layout.in_features)
    down = head.forward(server_in, w, b).to_bytes()
    back = EncryptedBatch.from_bytes(ctx, down, expect_kind="logits", expect_batch=x.shape[0])
    return head.decrypt_logits(ctx, back, dtype=torch.float64)


def _round_trip_backward(head, ctx, pub, g, w):
    up = head.encrypt_logit_grads(ctx, g).to_bytes()
    server_in = EncryptedBatch.from_bytes(pub, up, expect_kind="logit_grads", expect_dim=head.layout.num_classes)
    down = head.backward_input(server_in, w).to_bytes()
    back = EncryptedBatch.from_bytes(ctx, down, expect_kind="activation_grads")
    return head.decrypt_activation_grads(ctx, back, dtype=torch.float64)


@pytest.mark.parametrize(
    ("d", "k", "b", "capacity"),
    [
        (512, 5, 64, 64),  # the reference shape: 4 ciphertexts of 128 features x 32 rows
        (300, 5, 64, 64),  # d not a multiple of F=128
        (512, 5, 1, 64),  # one sample in a 64-sample layout
        (512, 5, 1, 1),  # batch_size 1: one ciphertext of 4096 features
        (512, 5, 37, 64),  # last, smaller (odd) batch
        (512, 14, 64, 64),  # ChestMNIST's 14 findings
        (100, 3, 70, 70),  # capacity not dividing the slots: 35 rows, F=117, 1 ciphertext
    ],
)
def test_forward_and_backward_match_torch(ctx, pub, d: int, k: int, b: int, capacity: int) -> None:
    w, bias = _head_weights(d, k, seed=d + k + b)
    head = PackedLinearHE(d, k, capacity, SLOTS)
    x = (torch.rand(b, d) * 2 - 1) * 10
    logits = _round_trip_forward(head, ctx, pub, x, w, bias)
    expected = F.linear(x.double(), w.double(), bias.double())
    assert logits.shape == (b, k)
    assert (logits - expected).abs().max().item() <= TOL

    g = torch.randn(b, k)
    xr = x.double().requires_grad_()
    (F.linear(xr, w.double(), bias.double()) * g.double()).sum().backward()
    grad = _round_trip_backward(head, ctx, pub, g, w)
    assert grad.shape == (b, d)
    assert (grad - xr.grad).abs().max().item() <= TOL


def test_default_dtype_output_feeds_autograd(ctx) -> None:
    """decrypt_* return torch's default dtype, so the gradient can go straight into .backward()."""
    head = PackedLinearHE(32, 3, 8, SLOTS)
    feats = torch.randn(8, 32, requires_grad=True)
    w, bias = _head_weights(32, 3, seed=1)
    logits = head.decrypt_logits(ctx, head.forward(head.encrypt_activations(ctx, feats.detach()), w, bias))
    assert logits.dtype == torch.get_default_dtype()
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    logits = logits.requires_grad_()
    F.cross_entropy(logits, target).backward()
    grad = head.decrypt_activation_grads(ctx, head.backward_input(head.encrypt_logit_grads(ctx, logits.grad), w))
    feats.backward(grad)
    assert torch.allclose(feats.grad, logits.grad @ w, atol=1e-5)


def test_layout_geometry() -> None:
    lay = PackedLayout(512, 5, 64, 4096)
    assert (lay.rows, lay.features_per_block, lay.n_blocks) == (32, 128, 4)
    assert lay.n_ciphertexts("activations") == 4 and lay.n_ciphertexts("logits") == 5
    odd = PackedLayout(100, 3, 70, 4096)
    assert (odd.rows, odd.features_per_block, odd.n_blocks, odd.used_slots) == (35, 117, 1, 4095)
    with pytest.raises(HEError, match="batch_size"):
        PackedLayout(10, 2, 8193, 4096)
    with pytest.raises(HEError, match="in_features"):
        PackedLayout(0, 2, 8, 4096)


def test_pack_unpack_round_trip_without_encryption() -> None:
    lay = PackedLayout(300, 7, 64, 4096)
    x = torch.randn(37, 300, dtype=torch.float64).numpy()
    w = torch.randn(7, 300, dtype=torch.float64).numpy()
    # the slotwise products the server computes, summed over blocks, then unpacked = x @ W.T
    z = lay.pack_activations(x)
    per_class = (z[None] * lay.weight_blocks(w)).sum(axis=1)
    assert abs(lay.unpack_logits(per_class, 37) - x @ w.T).max() < 1e-12
    g = torch.randn(37, 7, dtype=torch.float64).numpy()
    per_block = (lay.pack_logit_grads(g)[:, None] * lay.weight_blocks(w)).sum(axis=0)
    assert abs(lay.unpack_activation_grads(per_block, 37) - g @ w).max() < 1e-12


def test_zero_weights_and_zero_blocks(ctx, pub) -> None:
    """SEAL refuses products with an all-zero plaintext; those terms are skipped (or replaced by enc(0))."""
    head = PackedLinearHE(512, 4, 64, SLOTS)
    x = torch.randn(64, 512)
    zero = torch.zeros(4, 512)
    bias = torch.tensor([0.5, -1.0, 0.0, 2.0])
    assert (_round_trip_forward(head, ctx, pub, x, zero, bias) - bias.double()).abs().max() <= TOL
    assert _round_trip_backward(head, ctx, pub, torch.randn(64, 4), zero).abs().max() <= TOL
    w = torch.randn(4, 512) * 0.05
    w[:, :128] = 0  # a whole block of zeros
    w[2] = 0  # a whole class of zeros
    w[3, 128:256] = 1e-14  # nonzero, but rounds to zero at scale 2^40
    expected = F.linear(x.double(), w.double(), bias.double())
    assert (_round_trip_forward(head, ctx, pub, x, w, bias) - expected).abs().max() <= TOL


def test_weight_plaintexts_are_shared_per_version_and_never_stale(ctx, pub) -> None:
    head = PackedLinearHE(64, 3, 16, SLOTS)
    w, bias = _head_weights(64, 3, seed=5)
    w = w.clone()
    x, g = torch.randn(16, 64), torch.randn(16, 3)
    _round_trip_forward(head, ctx, pub, x, w, bias)
    _round_trip_backward(head, ctx, pub, g, w)
    assert len(head._cache) == 1  # forward and backward used the same encoded weights
    w.add_(0.01)  # an optimizer step in place: same tensor, new values
    logits = _round_trip_forward(head, ctx, pub, x, w, bias)
    assert (logits - F.linear(x.double(), w.double(), bias.double())).abs().max() <= TOL
    assert len(head._cache) == 2
    head.prepare(pub, w * 2)
    assert len(head._cache) == 2  # bounded: the oldest version was dropped
    head.clear_cache()
    assert not head._cache


def test_server_reads_but_never_writes_the_head(ctx, pub) -> None:
    head = PackedLinearHE(64, 3, 16, SLOTS)
    lin = torch.nn.Linear(64, 3)
    before = (lin.weight.detach().clone(), lin.bias.detach().clone(), lin.weight._version, lin.bias._version)
    enc_x = EncryptedBatch.from_bytes(pub, head.encrypt_activations(ctx, torch.randn(16, 64)).to_bytes())
    enc_g = EncryptedBatch.from_bytes(pub, head.encrypt_logit_grads(ctx, torch.randn(16, 3)).to_bytes())
    head.forward(enc_x, lin.weight, lin.bias)  # Parameters with requires_grad are fine
    head.backward_input(enc_g, lin.weight)
    with pytest.raises(HEError):
        head.forward(enc_g, lin.weight, lin.bias)  # wrong kind
    after = (lin.weight.detach(), lin.bias.detach(), lin.weight._version, lin.bias._version)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2:] == after[2:]
    assert lin.weight.grad is None


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.full((4, 16), float("nan")), r"non-finite value.*first activations x\[0, 0\] = nan"),
        (torch.tensor([[0.0] * 15 + [float("inf")]] * 4), r"non-finite.*x\[0, 15\] = inf"),
        (torch.zeros(4, 15), r"shape \(4, 15\); expected \(B, 16\)"),
        (torch.zeros(9, 16), r"1 <= B <= 8"),
        (torch.zeros(0, 16), r"1 <= B <= 8"),
        (torch.zeros(16), r"shape \(16,\)"),
        (torch.zeros(4, 16, dtype=torch.complex64), "complex"),
        ([[0.0] * 16] * 4, "must be a torch.Tensor"),
    ],
)
def test_encrypt_rejects_bad_activations(ctx, value, match: str) -> None:
    head = PackedLinearHE(16, 3, 8, SLOTS)
    with pytest.raises(HEError, match=match):
        head.encrypt_activations(ctx, value)


def test_encrypt_rejects_values_that_would_overflow(ctx) -> None:
    limit = max_abs_value(PRESETS["default"])
    head = PackedLinearHE(16, 3, 8, SLOTS)
    bound = head.input_bound(ctx)
    assert bound == limit / 64
    x = torch.zeros(4, 16)
    x[2, 7] = bound * 1.01
    with pytest.raises(HEError, match=r"x\[2, 7\] = .* exceeds the encryption bound 4096"):
        head.encrypt_activations(ctx, x)
    g = torch.zeros(4, 3)
    g[1, 1] = -1e9
    with pytest.raises(HEError, match=r"logit gradients g\[1, 1\] = -1e\+09 exceeds"):
        head.encrypt_logit_grads(ctx, g)
    with pytest.raises(HEError, match="exceeds max_abs_value"):
        PackedLinearHE(16, 3, 8, SLOTS, value_bound=limit * 2).encrypt_activations(ctx, torch.zeros(4, 16))
    with pytest.raises(HEError, match="value_bound"):
        PackedLinearHE(16, 3, 8, SLOTS, value_bound=float("nan"))


def test_server_refuses_weights_that_could_overflow(ctx, pub) -> None:
    head = PackedLinearHE(16, 3, 8, SLOTS)
    enc_x = EncryptedBatch.from_bytes(pub, head.encrypt_activations(ctx, torch.ones(8, 16)).to_bytes())
    huge = torch.full((3, 16), 100.0)  # 100 per slot x bound 4096 > 2^18
    with pytest.raises(HEError, match="could overflow"):
        head.forward(enc_x, huge, torch.zeros(3))
    assert not head._cache  # rejected before anything was encoded
    # a hospital that promises smaller values lets the server use larger weights
    small = PackedLinearHE(16, 3, 8, SLOTS, value_bound=16.0)
    enc = EncryptedBatch.from_bytes(pub, small.encrypt_activations(ctx, torch.ones(8, 16)).to_bytes())
    logits = small.decrypt_logits(ctx, small.forward(enc, huge, torch.zeros(3)), dtype=torch.float64)
    assert (logits - 1600.0).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("weight", "bias", "match"),
    [
        (torch.zeros(3, 15), torch.zeros(3), r"weight has shape \(3, 15\)"),
        (torch.zeros(16, 3), torch.zeros(3), r"weight has shape \(16, 3\)"),
        (torch.zeros(3, 16), torch.zeros(4), r"bias has shape \(4,\)"),
        (torch.full((3, 16), float("nan")), torch.zeros(3), "weight has 48 non-finite"),
        (torch.zeros(3, 16), torch.tensor([0.0, float("inf"), 0.0]), "bias has 1 non-finite"),
    ],
)
def test_server_rejects_bad_head_parameters(ctx, pub, weight, bias, match: str) -> None:
    head = PackedLinearHE(16, 3, 8, SLOTS)
    enc_x = EncryptedBatch.from_bytes(pub, head.encrypt_activations(ctx, torch.ones(8, 16)).to_bytes())
    with pytest.raises(HEError, match=match):
        head.forward(enc_x, weight, bias)


def test_head_and_context_must_agree(ctx) -> None:
    small_ctx = create_secret_context(PRESETS["small"])
    head = PackedLinearHE(16, 3, 8, SLOTS)
    with pytest.raises(HEError, match="built for 4096 slots but the context has 2048"):
        head.encrypt_activations(small_ctx, torch.zeros(8, 16))
    with pytest.raises(HEError, match="tenseal.Context"):
        head.encrypt_activations("ctx", torch.zeros(8, 16))


def test_small_preset_round_trip() -> None:
    """The N=4096 preset: twice the ciphertexts, ~1e-4 precision at scale 2^29."""
    ctx = create_secret_context(PRESETS["small"])
    pub = load_public_context(public_context_bytes(ctx))
    head = PackedLinearHE(512, 5, 64, PRESETS["small"].slots)
    w, bias = _head_weights(512, 5, seed=3)
    x = (torch.rand(64, 512) * 2 - 1) * 4
    logits = _round_trip_forward(head, ctx, pub, x, w, bias)
    assert (logits - F.linear(x.double(), w.double(), bias.double())).abs().max() <= 2e-4
