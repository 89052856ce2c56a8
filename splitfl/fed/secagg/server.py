"""The aggregator's side of secure aggregation: :class:`SecAggServer`, one per round.

It relays public keys and encrypted shares it cannot read, keeps only the
running sum of the masked inputs (never an individual one), enforces the
threshold at every step, and at the end reconstructs the survivors'
self-mask seeds and the dropped sites' mask keys to strip the masks and
de-quantise the sum. It depends on the primitives and the wire format only,
never on the client, so the server's view of the protocol is exactly what
arrives in messages.
"""
from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from splitfl.fed.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    SiteKeys,
    UnmaskRequest,
    UnmaskResponse,
    _check_round,
)
from splitfl.fed.secagg.primitives import (
    _KEY_BYTES,
    _SECRET_BYTES,
    DEFAULT_FRAC_BITS,
    SecAggError,
    _apply_prg,
    _check_round_id,
    _check_site_id,
    _hkdf,
    _pair_mask_key,
    dequantize,
    shamir_reconstruct,
)

__all__ = ["SecAggServer"]


class SecAggServer:
    """The aggregator: relays keys and shares, sums masked inputs, and unmasks the sum with the survivors' help.

    ``num_sites`` is the most sites that may join; ``threshold`` is t, the
    fewest sites that must remain at every step (2 <= t <= num_sites; the
    paper recommends t > num_sites / 2). It never sees an individual update.
    """

    def __init__(
        self, num_sites: int, threshold: int, vector_length: int, round_id: int, frac_bits: int = DEFAULT_FRAC_BITS
    ) -> None:
        if num_sites < 2:
            raise SecAggError(f"secure aggregation needs at least 2 sites, got {num_sites}.")
        if not 2 <= threshold <= num_sites:
            raise SecAggError(f"threshold {threshold} is out of range for {num_sites} sites (need 2 <= t <= n).")
        if vector_length < 1:
            raise SecAggError(f"vector length must be positive, got {vector_length}.")
        if not 0 <= frac_bits <= 52:
            raise SecAggError(f"frac_bits must be in [0, 52], got {frac_bits}.")
        self.num_sites, self.threshold, self.vector_length = num_sites, threshold, vector_length
        self.round_id, self.frac_bits = _check_round_id(round_id), frac_bits
        self._phase = 0
        self._keys: dict[int, SiteKeys] = {}  # U1
        self._share_msgs: dict[int, tuple[EncryptedShare, ...]] = {}  # U2
        self._sum: np.ndarray | None = None
        self._u3: set[int] = set()
        self._responses: dict[int, UnmaskResponse] = {}  # U4

    def _expect(self, phase: int, what: str) -> None:
        if self._phase != phase:
            raise SecAggError(f"server: {what} is not accepted now (step {self._phase}, needs step {phase}).")

    def _enough(self, n: int, what: str) -> None:
        if n < self.threshold:
            raise SecAggError(
                f"server: only {n} sites {what}, fewer than the threshold {self.threshold}; aborting the round."
            )

    # round 0
    def receive_keys(self, msg: AdvertiseKeys) -> None:
        """Round 0: record a site's public keys (U1)."""
        self._expect(0, "AdvertiseKeys")
        _check_round(msg.round_id, self.round_id, f"AdvertiseKeys from site {msg.site_id}")
        if msg.site_id in self._keys:
            raise SecAggError(f"server: duplicate site id {msg.site_id}: it advertised keys twice.")
        if len(self._keys) >= self.num_sites:
            raise SecAggError(f"server: site {msg.site_id} is one more than the {self.num_sites} expected sites.")
        _check_site_id(msg.site_id)
        if len(msg.keys.enc_public) != _KEY_BYTES or len(msg.keys.mask_public) != _KEY_BYTES:
            raise SecAggError(f"server: site {msg.site_id} sent malformed public keys.")
        self._keys[msg.site_id] = msg.keys

    def broadcast_keys(self) -> KeyBroadcast:
        """End round 0: everyone's keys plus threshold, vector length and frac_bits, for every site in U1."""
        self._expect(0, "broadcast_keys")
        self._enough(len(self._keys), "advertised keys")
        self._phase = 1
        return KeyBroadcast(
            self.round_id,
            self.threshold,
            self.vector_length,
            self.frac_bits,
            tuple(self._keys[i] for i in sorted(self._keys)),
        )

    # round 1
    def receive_shares(self, msg: ShareKeys) -> None:
        """Round 1: a site's encrypted shares, exactly one for every other site in U1 (U2)."""
        self._expect(1, "ShareKeys")
        _check_round(msg.round_id, self.round_id, f"ShareKeys from site {msg.site_id}")
        if msg.site_id not in self._keys:
            raise SecAggError(f"server: site {msg.site_id} sent shares but did not advertise keys.")
        if msg.site_id in self._share_msgs:
            raise SecAggError(f"server: site {msg.site_id} sent its shares twice.")
        recipients = sorted(s.recipient for s in msg.shares)
        if any(s.sender != msg.site_id for s in msg.shares) or recipients != sorted(set(self._keys) - {msg.site_id}):
            raise SecAggError(f"server: site {msg.site_id} did not send exactly one share to every other site.")
        self._share_msgs[msg.site_id] = msg.shares

    def deliver_shares(self) -> dict[int, ShareDelivery]:
        """End round 1: for each site in U2, the shares the other U2 sites addressed to it."""
        self._expect(1, "deliver_shares")
        self._enough(len(self._share_msgs), "shared keys")
        self._phase = 2
        inbox: dict[int, list[EncryptedShare]] = {v: [] for v in self._share_msgs}
        for shares in self._share_msgs.values():
            for s in shares:
                if s.recipient in inbox:
                    inbox[s.recipient].append(s)
        return {v: ShareDelivery(self.round_id, v, tuple(items)) for v, items in sorted(inbox.items())}

    # round 2
    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Round 2: add y_u to the running sum (U3); individual inputs are not kept."""
        self._expect(2, "MaskedInput")
        _check_round(msg.round_id, self.round_id, f"MaskedInput from site {msg.site_id}")
        if msg.site_id not in self._share_msgs:
            raise SecAggError(f"server: site {msg.site_id} sent a masked input but did not share keys.")
        if msg.site_id in self._u3:
            raise SecAggError(f"server: site {msg.site_id} sent its masked input twice.")
        y = msg.vector
        if y.size != self.vector_length:
            raise SecAggError(
                f"server: masked input from site {msg.site_id} has length {y.size}, expected {self.vector_length}."
            )
        if self._sum is None:
            self._sum = y.copy()
        else:
            np.add(self._sum, y, out=self._sum)
        self._u3.add(msg.site_id)

    def unmask_request(self) -> UnmaskRequest:
        """End round 2: tell the survivors (U3) who dropped after sharing keys (U2 minus U3)."""
        self._expect(2, "unmask_request")
        self._enough(len(self._u3), "sent masked inputs")
        self._phase = 3
        return UnmaskRequest(self.round_id, tuple(sorted(self._u3)), tuple(sorted(set(self._share_msgs) - self._u3)))

    # round 3
    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Round 3: a survivor's shares (U4); must be exactly b-shares for U3 and key shares for the dropped."""
        self._expect(3, "UnmaskResponse")
        _check_round(msg.round_id, self.round_id, f"UnmaskResponse from site {msg.site_id}")
        if msg.site_id not in self._u3:
            raise SecAggError(f"server: unmask response from site {msg.site_id}, which is not a survivor.")
        if msg.site_id in self._responses:
            raise SecAggError(f"server: site {msg.site_id} answered the unmask round twice.")
        dropped = set(self._share_msgs) - self._u3
        if set(msg.self_mask_shares) != self._u3 or set(msg.mask_key_shares) != dropped:
            raise SecAggError(f"server: unmask response from site {msg.site_id} does not match the request.")
        self._responses[msg.site_id] = msg

    def result(self) -> np.ndarray:
        """End round 3: reconstruct the secrets, remove every remaining mask, return the float64 sum over U3."""
        self._expect(3, "result")
        self._enough(len(self._responses), "answered the unmask round")
        self._phase = 4
        assert self._sum is not None
        total = self._sum
        self._sum = None
        t, rid = self.threshold, self.round_id
        for v in sorted(self._u3):
            b = shamir_reconstruct({u + 1: r.self_mask_shares[v] for u, r in self._responses.items()}, t)
            if b >> (8 * _SECRET_BYTES):
                raise SecAggError(f"server: the self-mask seed of site {v} did not reconstruct (inconsistent shares).")
            _apply_prg(total, _hkdf(b.to_bytes(_SECRET_BYTES, "big"), b"self-mask", rid, v), subtract=True)
        for d in sorted(set(self._share_msgs) - self._u3):
            s = shamir_reconstruct({u + 1: r.mask_key_shares[d] for u, r in self._responses.items()}, t)
            key = X25519PrivateKey.from_private_bytes(s.to_bytes(_SECRET_BYTES, "big")) if not s >> 256 else None
            if key is None or key.public_key().public_bytes_raw() != self._keys[d].mask_public:
                raise SecAggError(
                    f"server: the mask key of dropped site {d} did not reconstruct to its advertised public key."
                )
            for v in sorted(self._u3):
                # y_v carries +PRG(s_vd) if v < d, -PRG(s_vd) if v > d: undo it.
                _apply_prg(total, _pair_mask_key(key, self._keys[v].mask_public, rid, v, d), subtract=v < d)
        return dequantize(total, self.frac_bits)

    @property
    def survivors(self) -> tuple[int, ...]:
        """U3: the sites whose inputs are in the sum."""
        return tuple(sorted(self._u3))

