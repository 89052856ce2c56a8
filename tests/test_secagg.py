"""Pairwise-mask secure aggregation: correctness, masking, dropout, refusals, wire format (real crypto throughout)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from splitfl.fed.secagg import (
    DEFAULT_FRAC_BITS,
    AdvertiseKeys,
    KeyBroadcast,
    MaskedInput,
    SecAggClient,
    SecAggError,
    SecAggServer,
    SecureSumResult,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
    dequantize,
    quantize,
    secure_sum,
    self_mask,
    shamir_reconstruct,
    shamir_split,
)

L = 1000


def _updates(n: int, length: int = L, seed: int = 0, scale: float = 0.1) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal(length) * scale for i in range(n)}


def _tolerance(n_sites: int, frac_bits: int = DEFAULT_FRAC_BITS) -> float:
    """Each input is rounded to the nearest multiple of 2^-frac_bits, so the sum is off by < n * 2^-frac_bits."""
    return n_sites * 2.0**-frac_bits


def _run_to_unmask(updates, threshold, round_id, keys=None, frac_bits=DEFAULT_FRAC_BITS):
    """Rounds 0-2 by hand; returns the server, the clients, their masked inputs and the unmask request."""
    keys = keys or {}
    length = len(next(iter(updates.values())))
    server = SecAggServer(len(updates), threshold, length, round_id, frac_bits)
    clients = {i: SecAggClient(i, round_id, **keys.get(i, {})) for i in sorted(updates)}
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    broadcast = server.broadcast_keys()
    for c in clients.values():
        server.receive_shares(c.share_keys(broadcast))
    deliveries = server.deliver_shares()
    masked = {i: c.masked_input(deliveries[i], updates[i]) for i, c in clients.items()}
    for m in masked.values():
        server.receive_masked_input(m)
    return server, clients, masked, server.unmask_request()


def _self_seeds(responses: dict[int, UnmaskResponse], threshold: int) -> dict[int, bytes]:
    """What the server reconstructs in round 3: every survivor's self-mask seed b_u."""
    owners = next(iter(responses.values())).self_mask_shares
    return {
        v: shamir_reconstruct({u + 1: r.self_mask_shares[v] for u, r in responses.items()}, threshold).to_bytes(
            32, "big"
        )
        for v in owners
    }


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("frac_bits", [16, DEFAULT_FRAC_BITS])
def test_secure_sum_equals_plaintext_sum_within_quantisation(frac_bits):
    updates = _updates(5)
    updates[3] = updates[3].astype(np.float32)  # float32 inputs are accepted as they are
    total = secure_sum(updates, threshold=3, round_id=1, frac_bits=frac_bits).total
    plain = sum(u.astype(np.float64) for u in updates.values())
    assert total.dtype == np.float64 and total.shape == (L,)
    assert np.max(np.abs(total - plain)) < _tolerance(5, frac_bits)


def test_secure_sum_one_million_floats_and_byte_counts():
    n, length = 3, 1_000_000
    updates = _updates(n, length, seed=1, scale=0.01)
    result = secure_sum(updates, threshold=2, round_id=9)
    assert isinstance(result, SecureSumResult)
    assert np.max(np.abs(result.total - sum(updates.values()))) < _tolerance(n)
    for i in range(n):
        # header 14 B + site id 4 B + length 8 B + 8 B per element; the key rounds are small.
        assert result.sent[i]["masked_input"] == 26 + 8 * length
        assert result.received[i]["masked_input"] == 0
        assert 0 < result.sent[i]["advertise_keys"] < 100
        assert result.total_sent(i) - result.sent[i]["masked_input"] < 2000
        assert result.total_received(i) < 2000
    assert result.survivors == (0, 1, 2)
    assert result.bytes_up == sum(result.total_sent(i) for i in range(n))
    assert result.bytes_down == sum(result.total_received(i) for i in range(n))


def test_server_round_by_round_matches_secure_sum():
    updates = _updates(4, seed=2)
    server, clients, _, request = _run_to_unmask(updates, 3, round_id=4)
    assert request.survivors == (0, 1, 2, 3) and request.dropped == ()
    for c in clients.values():
        server.receive_unmask(c.unmask(request))
    assert np.max(np.abs(server.result() - sum(updates.values()))) < _tolerance(4)


# --------------------------------------------------------------------------- what the server sees


def test_masked_input_is_indistinguishable_from_noise():
    length = 4000
    ramp = np.linspace(-1.0, 1.0, length)  # strongly structured input
    updates = {0: ramp, 1: -ramp, 2: ramp**2}
    _, _, masked, _ = _run_to_unmask(updates, 2, round_id=3)
    y = masked[0].vector
    q = quantize(ramp, DEFAULT_FRAC_BITS, 3)
    assert np.count_nonzero(y == q) == 0  # the mask hides every coordinate
    signed = y.view(np.int64).astype(np.float64)
    assert abs(np.corrcoef(signed, ramp)[0, 1]) < 0.1
    # Uniform on Z_2^64: each bit is set about half the time (6 sigma bounds).
    for bit in (0, 31, 63):
        frac = np.mean((y >> np.uint64(bit)) & np.uint64(1))
        assert abs(frac - 0.5) < 0.05
    # Two sites' masked inputs of related updates share nothing visible either.
    assert abs(np.corrcoef(signed, masked[1].vector.view(np.int64).astype(np.float64))[0, 1]) < 0.1


def test_pairwise_masks_cancel_exactly_and_protect_single_inputs_from_the_server():
    """The server learns every survivor's self-mask seed in round 3; the pairwise masks still hide each input."""
    updates = _updates(4, seed=5)
    server, clients, masked, request = _run_to_unmask(updates, 3, round_id=11)
    responses = {i: c.unmask(request) for i, c in clients.items()}
    assert all(r.mask_key_shares == {} for r in responses.values())  # nobody dropped: no mask key is revealed
    seeds = _self_seeds(responses, 3)
    residual = {}
    for i, m in masked.items():
        pair = m.vector - quantize(updates[i], DEFAULT_FRAC_BITS, 4) - self_mask(seeds[i], i, 11, L)
        assert np.count_nonzero(pair == 0) == 0  # one site's pairwise masks do not cancel alone
        residual[i] = pair
    assert np.count_nonzero(residual[0] + residual[1]) == L  # nor do a strict subset's
    assert np.count_nonzero(residual[0] + residual[1] + residual[2] + residual[3]) == 0  # all of them do, exactly
    for i in clients:
        server.receive_unmask(responses[i])
    assert np.max(np.abs(server.result() - sum(updates.values()))) < _tolerance(4)


def test_masks_differ_across_round_ids_even_with_the_same_keys():
    keys = {i: {"enc_key": X25519PrivateKey.generate(), "mask_key": X25519PrivateKey.generate()} for i in range(3)}
    updates = {i: np.zeros(L) for i in range(3)}

    def pairwise_mask_of_site0(round_id):
        _, clients, masked, request = _run_to_unmask(updates, 2, round_id, keys=keys)
        seeds = _self_seeds({i: c.unmask(request) for i, c in clients.items()}, 2)
        return masked[0].vector - self_mask(seeds[0], 0, round_id, L)

    first, again, other = pairwise_mask_of_site0(1), pairwise_mask_of_site0(1), pairwise_mask_of_site0(2)
    np.testing.assert_array_equal(first, again)  # same keys, same round: the derivation is deterministic
    assert np.count_nonzero(first == other) == 0  # next round: fresh masks everywhere
    seed = bytes(range(32))
    assert np.count_nonzero(self_mask(seed, 0, 1, L) == self_mask(seed, 0, 2, L)) == 0
    assert np.count_nonzero(self_mask(seed, 0, 1, L) == self_mask(seed, 1, 1, L)) == 0


# --------------------------------------------------------------------------- dropout


def test_dropout_after_sharing_keys_sums_the_survivors():
    updates = _updates(4, seed=7)
    result = secure_sum(updates, threshold=3, round_id=2, drop_after_share={1})
    total = result.total
    assert result.survivors == (0, 2, 3)
    assert result.sent[1]["masked_input"] == 0
    expected = updates[0] + updates[2] + updates[3]
    assert np.max(np.abs(total - expected)) < _tolerance(3)


def test_dropout_before_sharing_and_after_masking():
    updates = _updates(5, seed=8)
    total = secure_sum(updates, threshold=3, round_id=3, drop_after_advertise={0}).total
    assert np.max(np.abs(total - sum(updates[i] for i in (1, 2, 3, 4)))) < _tolerance(4)
    # A site that vanishes after sending its masked input is still in the sum.
    total = secure_sum(updates, threshold=3, round_id=4, drop_after_share={4}, drop_after_mask={0}).total
    assert np.max(np.abs(total - sum(updates[i] for i in (0, 1, 2, 3)))) < _tolerance(4)


@pytest.mark.parametrize("where", ["drop_after_advertise", "drop_after_share", "drop_after_mask"])
def test_too_many_dropouts_abort(where):
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        secure_sum(_updates(4), threshold=3, round_id=5, **{where: {0, 1}})


# --------------------------------------------------------------------------- refusals and tampering


@pytest.fixture
def at_unmask():
    return _run_to_unmask(_updates(4, seed=9), 3, round_id=6)


def test_client_refuses_to_reveal_both_secrets_of_one_site(at_unmask):
    _, clients, _, _ = at_unmask
    overlapping = UnmaskRequest(6, survivors=(0, 1, 2, 3), dropped=(3,))
    with pytest.raises(SecAggError, match=r"both surviving and dropped.*\[3\]|\[3\].*both"):
        clients[0].unmask(overlapping)


def test_client_answers_the_unmask_round_once(at_unmask):
    _, clients, _, _ = at_unmask
    clients[1].unmask(UnmaskRequest(6, survivors=(0, 1, 2), dropped=(3,)))  # first: site 3's key shares
    with pytest.raises(SecAggError, match="second unmask request"):
        clients[1].unmask(UnmaskRequest(6, survivors=(0, 1, 2, 3), dropped=()))  # then site 3's seed: refused


def test_client_refuses_inconsistent_unmask_requests(at_unmask):
    _, clients, _, _ = at_unmask
    with pytest.raises(SecAggError, match="as not surviving"):
        clients[2].unmask(UnmaskRequest(6, survivors=(0, 1, 3), dropped=(2,)))
    with pytest.raises(SecAggError, match="shared keys are"):
        clients[0].unmask(UnmaskRequest(6, survivors=(0, 1, 2), dropped=()))
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients[1].unmask(UnmaskRequest(6, survivors=(0, 1), dropped=(2, 3)))


def _run_to_delivery(n=3, round_id=7):
    server = SecAggServer(n, 2, L, round_id)
    clients = {i: SecAggClient(i, round_id) for i in range(n)}
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    broadcast = server.broadcast_keys()
    for c in clients.values():
        server.receive_shares(c.share_keys(broadcast))
    return server, clients, server.deliver_shares()


@pytest.mark.parametrize("part", ["ciphertext", "nonce", "sender"])
def test_tampered_share_is_rejected_naming_the_site(part):
    _, clients, deliveries = _run_to_delivery()
    delivery = deliveries[2]
    if part == "sender":  # site 0's share re-labelled as site 1's fails too: the ids are associated data
        shares = [dataclasses.replace(s, sender=1) for s in delivery.shares if s.sender == 0]
        site = 1
    else:
        shares = []
        for s in delivery.shares:
            if s.sender == 0:
                raw = bytearray(getattr(s, part))
                raw[3] ^= 0x01
                s = dataclasses.replace(s, **{part: bytes(raw)})
            shares.append(s)
        site = 0
    tampered = dataclasses.replace(delivery, shares=tuple(shares))
    with pytest.raises(SecAggError, match=f"share from site {site} failed AES-GCM authentication"):
        clients[2].masked_input(tampered, np.zeros(L))


def test_tampering_in_the_wire_bytes_is_caught_too():
    _, clients, deliveries = _run_to_delivery()
    data = bytearray(deliveries[1].to_bytes())
    data[-5] ^= 0x80  # inside the last ciphertext
    with pytest.raises(SecAggError, match="failed AES-GCM authentication"):
        clients[1].masked_input(ShareDelivery.from_bytes(bytes(data)), np.zeros(L))


# --------------------------------------------------------------------------- input and parameter errors


def test_overflow_and_non_finite_inputs_are_rejected():
    updates = _updates(4)
    updates[2] = updates[2].copy()
    updates[2][10] = 2.0**30  # with 4 sites and 32 fractional bits, |x| must stay below 2^28
    with pytest.raises(SecAggError, match=r"ring Z_2\^64 holds only"):
        secure_sum(updates, threshold=3, round_id=1)
    assert np.isfinite(secure_sum(updates, threshold=3, round_id=1, frac_bits=16).total).all()  # fewer bits: fits
    for bad in (np.nan, np.inf, -np.inf):
        updates[2][10] = bad
        with pytest.raises(SecAggError, match="non-finite"):
            secure_sum(updates, threshold=3, round_id=1)


def test_wrong_vector_length_and_shape():
    updates = _updates(3)
    updates[1] = updates[1][:-1]
    with pytest.raises(SecAggError, match=r"site 1: update has shape \(999,\), expected \(1000,\)"):
        secure_sum(updates, threshold=2, round_id=1)
    with pytest.raises(SecAggError, match="1-D"):
        secure_sum({0: np.zeros((2, 3)), 1: np.zeros((2, 3))}, threshold=2, round_id=1)
    server = SecAggServer(2, 2, L, 1)
    with pytest.raises(SecAggError, match="not accepted now"):
        server.receive_masked_input(MaskedInput(1, 0, bytes(8 * L)))


@pytest.mark.parametrize("n, t", [(4, 1), (4, 5), (1, 1), (3, 0)])
def test_threshold_out_of_range(n, t):
    with pytest.raises(SecAggError, match="threshold|at least 2 sites"):
        secure_sum(_updates(n), threshold=t, round_id=1)


def test_duplicate_site_ids_and_foreign_rounds_are_rejected():
    server = SecAggServer(3, 2, L, round_id=1)
    c = SecAggClient(0, round_id=1)
    msg = c.advertise_keys()
    server.receive_keys(msg)
    with pytest.raises(SecAggError, match="duplicate site id 0"):
        server.receive_keys(SecAggClient(0, round_id=1).advertise_keys())
    with pytest.raises(SecAggError, match="round 2, this aggregation is round 1"):
        server.receive_keys(SecAggClient(1, round_id=2).advertise_keys())
    # A broadcast that repeats a site is refused by the sites.
    broadcast = KeyBroadcast(1, 2, L, DEFAULT_FRAC_BITS, (msg.keys, msg.keys))
    with pytest.raises(SecAggError, match="lists a site id twice"):
        c.share_keys(broadcast)
    with pytest.raises(SecAggError, match="site id"):
        SecAggClient(-1, round_id=1)


def test_calls_out_of_order_are_rejected():
    c = SecAggClient(0, round_id=1)
    with pytest.raises(SecAggError, match="out of order"):
        c.unmask(UnmaskRequest(1, (0, 1), ()))
    server = SecAggServer(3, 2, L, round_id=1)
    server.receive_keys(c.advertise_keys())
    with pytest.raises(SecAggError, match="only 1 sites advertised keys"):
        server.broadcast_keys()


# --------------------------------------------------------------------------- building blocks


def test_messages_round_trip_and_reject_malformed_bytes(at_unmask):
    _, clients, masked, request = at_unmask
    c = SecAggClient(5, round_id=6)
    msgs = [c.advertise_keys(), request, masked[0], clients[0].unmask(request)]
    msgs.append(ShareKeys(6, 1, ()))
    msgs.append(KeyBroadcast(6, 3, L, 20, (msgs[0].keys,)))
    for m in msgs:
        data = m.to_bytes()
        back = decode_message(data)
        assert type(back) is type(m) and back == m
        assert type(m).from_bytes(data) == m
        with pytest.raises(SecAggError, match="truncated|too short"):
            decode_message(data[:-1])
        with pytest.raises(SecAggError, match="trailing"):
            type(m).from_bytes(data + b"\0")
    with pytest.raises(SecAggError, match="magic"):
        AdvertiseKeys.from_bytes(b"XXXX" + msgs[0].to_bytes()[4:])
    with pytest.raises(SecAggError, match="message type"):
        AdvertiseKeys.from_bytes(request.to_bytes())


def test_shamir_any_t_shares_reconstruct_fewer_do_not():
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5])
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 5, 2]):
        assert shamir_reconstruct({x: shares[x] for x in subset}, 3) == secret
    assert shamir_reconstruct({x: shares[x] for x in (1, 2)}, 2) != secret  # t-1 shares: a random field element
    with pytest.raises(SecAggError, match="need 3 shares"):
        shamir_reconstruct({1: shares[1], 2: shares[2]}, 3)


def test_quantisation_round_trip_is_exact_to_the_grid():
    x = np.array([-1.5, -(2.0**-33), 0.0, 2.0**-33, 3.25, 1e-3], dtype=np.float64)
    q = quantize(x, 32, 4)
    assert q.dtype == np.dtype("<u8")
    back = dequantize(q, 32)
    assert np.max(np.abs(back - x)) <= 2.0**-33
    np.testing.assert_array_equal(
        quantize(x.astype(np.float32), 32, 4), quantize(x.astype(np.float32).astype(np.float64), 32, 4)
    )
    # Negative values wrap to the top of the ring and come back in the sum.
    assert dequantize(q[:1] + quantize(np.array([2.0]), 32, 4), 32)[0] == 0.5
