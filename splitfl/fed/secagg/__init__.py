"""Pairwise-mask secure aggregation (Bonawitz et al., CCS 2017), semi-honest server.

The cheap alternative to CKKS aggregation for FedAvg: each site adds masks
to its quantised update that cancel in the sum, so the server learns the sum
of the sites' updates and never an individual one. Dropouts are tolerated:
the sites' mask secrets are Shamir-shared t-of-n, so the survivors let the
server remove the masks of sites that vanished mid-round.

Protocol (one instance per training round; fresh keys, ``round_id`` in every
derivation so masks never repeat)::

    round 0  site u -> server  AdvertiseKeys(c_u^PK, s_u^PK)      server -> all  KeyBroadcast
    round 1  site u -> server  ShareKeys: for each v, AES-GCM under HKDF(X25519(c_u, c_v))
                               of (Shamir share of b_u, share of s_u^SK)   server -> v  ShareDelivery
    round 2  site u -> server  MaskedInput y_u = q(x_u) + PRG(b_u)
                               + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)   (mod 2^64)
    round 3  server -> survivors UnmaskRequest(survivors, dropped)
             site u -> server  UnmaskResponse: shares of b_v for survivors,
                               of s_v^SK for dropped sites -- never both for one site
             server: reconstructs, removes PRG(b_v) and the dropped sites' pairwise masks,
                     and de-quantises the sum.

Sets as in the paper: U1 advertised keys, U2 shared keys (pairwise masks are
made with U2), U3 sent masked inputs (the sum is over U3), U4 answered the
unmask round. Each of them needs at least ``threshold`` sites.

Primitives (``cryptography``): X25519 key agreement, HKDF-SHA256, AES-256-GCM
for the shares the server relays, AES-256-CTR as the PRG (keystream read
straight into ``uint64`` in 1 MiB chunks). Shamir sharing is over the
Mersenne prime 2^521 - 1, evaluation point ``site_id + 1``.

Security model and limits: the server and the sites follow the protocol
(semi-honest); no signatures, so an actively malicious server could
impersonate sites; the transport (TLS) authenticates the server. The server
learns the sum over U3 and which sites dropped. ``threshold > num_sites / 2``
is the paper's recommendation; only ``2 <= threshold <= num_sites`` is
enforced.

Messages are plain dataclasses of ints and bytes with ``to_bytes`` /
``from_bytes`` (little-endian, magic ``SFSA``, version, type, round id);
:func:`secure_sum` passes every message through its wire form in-process and
counts the bytes, as the gRPC transport will.

The package is split by role, each module importing only those before it:
:mod:`~splitfl.fed.secagg.primitives` (constants, key derivation, PRG, fixed
point, Shamir), :mod:`~splitfl.fed.secagg.messages` (the wire format),
:mod:`~splitfl.fed.secagg.client` (a site), :mod:`~splitfl.fed.secagg.server`
(the aggregator) and :mod:`~splitfl.fed.secagg.driver` (:func:`secure_sum`).
Every public name is re-exported here.
"""
from __future__ import annotations

from splitfl.fed.secagg.client import SecAggClient
from splitfl.fed.secagg.driver import ROUNDS, SecureSumResult, secure_sum
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
    decode_message,
)
from splitfl.fed.secagg.primitives import (
    DEFAULT_FRAC_BITS,
    PRIME,
    SecAggError,
    dequantize,
    max_abs_input,
    quantize,
    self_mask,
    shamir_reconstruct,
    shamir_split,
)
from splitfl.fed.secagg.server import SecAggServer

__all__ = [
    "DEFAULT_FRAC_BITS",
    "PRIME",
    "ROUNDS",
    "AdvertiseKeys",
    "EncryptedShare",
    "KeyBroadcast",
    "MaskedInput",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "SecureSumResult",
    "ShareDelivery",
    "ShareKeys",
    "SiteKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
    "dequantize",
    "max_abs_input",
    "quantize",
    "secure_sum",
    "self_mask",
    "shamir_reconstruct",
    "shamir_split",
]
