"""The site's side of secure aggregation: one :class:`SecAggClient` per site and round.

It holds the site's secrets (the X25519 share-encryption and mask keys and
the self-mask seed b_u), Shamir-shares them to its peers under AES-GCM,
masks its quantised update, and in the unmask round reveals, for each other
site, only one of its two secrets -- the checks that keep a curious server
from learning an individual update are here, which is why this module is
kept apart from the server's.
"""
from __future__ import annotations

import secrets

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
    _NONCE_BYTES,
    _SECRET_BYTES,
    _SHARE_BYTES,
    SecAggError,
    _apply_prg,
    _check_round_id,
    _check_site_id,
    _hkdf,
    _pair_ids,
    _pair_mask_key,
    _share_aad,
    quantize,
    shamir_split,
)

__all__ = ["SecAggClient"]


class SecAggClient:
    """One site's side of one aggregation round; call the four round methods in order, once each.

    Keys are fresh per instance, as the paper prescribes. ``enc_key`` /
    ``mask_key`` let a deployment reuse long-term keys instead; ``round_id``
    enters every key derivation, so masks still never repeat across rounds.
    """

    def __init__(
        self,
        site_id: int,
        round_id: int,
        *,
        enc_key: X25519PrivateKey | None = None,
        mask_key: X25519PrivateKey | None = None,
    ) -> None:
        self.site_id = _check_site_id(site_id)
        self.round_id = _check_round_id(round_id)
        self._enc_key = enc_key or X25519PrivateKey.generate()
        self._mask_key = mask_key or X25519PrivateKey.generate()
        self._phase = 0
        self._peers: dict[int, SiteKeys] = {}
        self._own_shares: tuple[int, int] = (0, 0)  # this site's share of its own (b_u, s_u^SK)
        self._received: dict[int, tuple[int, int]] = {}  # sender -> (share of b_sender, share of s_sender^SK)
        self._u2: frozenset[int] = frozenset()

    def _advance(self, expected: int, what: str) -> None:
        if self._phase != expected:
            raise SecAggError(
                f"site {self.site_id}: {what} called out of order (at step {self._phase}, expected {expected})."
            )
        self._phase += 1

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: publish the share-encryption and mask-agreement public keys."""
        self._advance(0, "advertise_keys")
        return AdvertiseKeys(
            self.round_id,
            SiteKeys(
                self.site_id,
                self._enc_key.public_key().public_bytes_raw(),
                self._mask_key.public_key().public_bytes_raw(),
            ),
        )

    def share_keys(self, broadcast: KeyBroadcast) -> ShareKeys:
        """Round 1: check the broadcast, draw b_u, and send every other site its encrypted shares of b_u and s_u^SK."""
        self._advance(1, "share_keys")
        _check_round(broadcast.round_id, self.round_id, "key broadcast")
        ids = [k.site_id for k in broadcast.sites]
        if len(set(ids)) != len(ids):
            raise SecAggError(f"site {self.site_id}: key broadcast lists a site id twice.")
        pubs = [k.enc_public for k in broadcast.sites] + [k.mask_public for k in broadcast.sites]
        if len(set(pubs)) != len(pubs):
            raise SecAggError(f"site {self.site_id}: key broadcast repeats a public key.")
        n, t = len(ids), broadcast.threshold
        if not 2 <= t <= n:
            raise SecAggError(f"site {self.site_id}: threshold {t} is out of range for {n} sites (need 2 <= t <= n).")
        self._peers = {k.site_id: k for k in broadcast.sites}
        own = self._peers.get(self.site_id)
        if (
            own is None
            or own.enc_public != self._enc_key.public_key().public_bytes_raw()
            or (own.mask_public != self._mask_key.public_key().public_bytes_raw())
        ):
            raise SecAggError(f"site {self.site_id}: key broadcast does not carry this site's own keys.")
        self._threshold, self._length, self._frac_bits = t, broadcast.vector_length, broadcast.frac_bits

        self._seed = secrets.token_bytes(_SECRET_BYTES)
        xs = [i + 1 for i in ids]
        b_shares = shamir_split(int.from_bytes(self._seed, "big"), t, xs)
        s_shares = shamir_split(int.from_bytes(self._mask_key.private_bytes_raw(), "big"), t, xs)
        self._own_shares = (b_shares[self.site_id + 1], s_shares[self.site_id + 1])
        out = []
        for v in ids:
            if v == self.site_id:
                continue
            plain = b_shares[v + 1].to_bytes(_SHARE_BYTES, "little") + s_shares[v + 1].to_bytes(_SHARE_BYTES, "little")
            key = self._share_key(v)
            nonce = secrets.token_bytes(_NONCE_BYTES)
            ct = AESGCM(key).encrypt(nonce, plain, _share_aad(self.round_id, self.site_id, v))
            out.append(EncryptedShare(self.site_id, v, nonce, ct))
        return ShareKeys(self.round_id, self.site_id, tuple(out))

    def _share_key(self, peer: int) -> bytes:
        shared = self._enc_key.exchange(X25519PublicKey.from_public_bytes(self._peers[peer].enc_public))
        return _hkdf(shared, b"share-enc", self.round_id, *_pair_ids(self.site_id, peer))

    def masked_input(self, delivery: ShareDelivery, update: np.ndarray) -> MaskedInput:
        """Round 2: decrypt the shares addressed here (U2 = their senders and us) and send y_u.

        ``update`` is the 1-D float update, already multiplied by its aggregation weight.
        """
        self._advance(2, "masked_input")
        _check_round(delivery.round_id, self.round_id, "share delivery")
        if delivery.recipient != self.site_id:
            raise SecAggError(f"site {self.site_id}: got the share delivery for site {delivery.recipient}.")
        for s in delivery.shares:
            if s.recipient != self.site_id:
                raise SecAggError(
                    f"site {self.site_id}: delivery holds a share from site {s.sender} addressed to site {s.recipient}."
                )
            if s.sender == self.site_id or s.sender not in self._peers:
                raise SecAggError(f"site {self.site_id}: delivery holds a share from unknown site {s.sender}.")
            if s.sender in self._received:
                raise SecAggError(f"site {self.site_id}: delivery holds two shares from site {s.sender}.")
            try:
                plain = AESGCM(self._share_key(s.sender)).decrypt(
                    s.nonce, s.ciphertext, _share_aad(self.round_id, s.sender, self.site_id)
                )
            except InvalidTag:
                raise SecAggError(
                    f"site {self.site_id}: the share from site {s.sender} failed AES-GCM authentication "
                    "(tampered with or corrupted in transit)."
                ) from None
            if len(plain) != 2 * _SHARE_BYTES:
                raise SecAggError(f"site {self.site_id}: the share from site {s.sender} has the wrong size.")
            self._received[s.sender] = (
                int.from_bytes(plain[:_SHARE_BYTES], "little"),
                int.from_bytes(plain[_SHARE_BYTES:], "little"),
            )
        self._u2 = frozenset(self._received) | {self.site_id}
        if len(self._u2) < self._threshold:
            raise SecAggError(
                f"site {self.site_id}: only {len(self._u2)} sites shared keys, "
                f"fewer than the threshold {self._threshold}."
            )

        x = np.asarray(update)
        if x.ndim != 1 or x.size != self._length:
            raise SecAggError(f"site {self.site_id}: update has shape {x.shape}, expected ({self._length},).")
        y = quantize(x, self._frac_bits, len(self._u2))
        _apply_prg(y, _hkdf(self._seed, b"self-mask", self.round_id, self.site_id))
        for v in sorted(self._u2 - {self.site_id}):
            key = _pair_mask_key(self._mask_key, self._peers[v].mask_public, self.round_id, self.site_id, v)
            _apply_prg(y, key, subtract=v < self.site_id)
        return MaskedInput(self.round_id, self.site_id, memoryview(y).cast("B"))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3: shares of b_v for survivors, of s_v^SK for dropped sites; refuses anything that could reveal both.

        Answered once only: a second request could ask for the other secret of a site.
        """
        if self._phase == 4:
            raise SecAggError(
                f"site {self.site_id}: refusing a second unmask request; answering twice could reveal both "
                "the self-mask seed and the mask key of one site."
            )
        self._advance(3, "unmask")
        _check_round(request.round_id, self.round_id, "unmask request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped
        if both:
            raise SecAggError(
                f"site {self.site_id}: refusing to unmask: sites {sorted(both)} are listed as both surviving and "
                "dropped, which would reveal both their self-mask seed and their mask key."
            )
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecAggError(f"site {self.site_id}: unmask request lists a site twice.")
        if self.site_id not in survivors:
            raise SecAggError(
                f"site {self.site_id}: refusing to unmask: the request lists this site, "
                "which sent its masked input, as not surviving."
            )
        if survivors | dropped != self._u2:
            raise SecAggError(
                f"site {self.site_id}: unmask request covers sites {sorted(survivors | dropped)}, "
                f"but the sites that shared keys are {sorted(self._u2)}."
            )
        if len(survivors) < self._threshold:
            raise SecAggError(
                f"site {self.site_id}: only {len(survivors)} survivors, fewer than the threshold {self._threshold}."
            )
        shares = dict(self._received)
        shares[self.site_id] = self._own_shares
        return UnmaskResponse(
            self.round_id,
            self.site_id,
            {v: shares[v][0] for v in sorted(survivors)},
            {v: shares[v][1] for v in sorted(dropped)},
        )

