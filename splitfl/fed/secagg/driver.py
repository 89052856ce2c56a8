"""In-process secure aggregation: :func:`secure_sum` runs a server and its sites in one process.

The simulated regime (``splitfl.fed.runner``) and the tests use it to get
the masked sum of a round's updates without a network: it drives one
:class:`SecAggServer` and a :class:`SecAggClient` per site through the four
rounds, simulates dropouts at each step, and passes every message through
its wire form so that :class:`SecureSumResult` counts the bytes a transport
would carry. It sits on top of the package because it is the only place
that holds both roles at once.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from splitfl.fed.secagg.client import SecAggClient
from splitfl.fed.secagg.primitives import DEFAULT_FRAC_BITS, SecAggError, _check_site_id
from splitfl.fed.secagg.server import SecAggServer

__all__ = ["ROUNDS", "SecureSumResult", "secure_sum"]

# Round names as used in SecureSumResult.sent / .received.
ROUNDS: tuple[str, ...] = ("advertise_keys", "share_keys", "masked_input", "unmask")


@dataclass
class SecureSumResult:
    """What :func:`secure_sum` returns: the sum, whose inputs it holds, and the wire bytes per site and round.

    ``sent[site][round]`` counts the serialised bytes the site sent to the
    server, ``received[site][round]`` those the server sent to it; rounds are
    :data:`ROUNDS`. Every site that took part has a row (zeros where it had
    already dropped).
    """

    total: np.ndarray
    survivors: tuple[int, ...]
    sent: dict[int, dict[str, int]] = field(default_factory=dict)
    received: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def bytes_up(self) -> int:
        """All bytes the sites sent to the server."""
        return sum(sum(row.values()) for row in self.sent.values())

    @property
    def bytes_down(self) -> int:
        """All bytes the server sent to the sites."""
        return sum(sum(row.values()) for row in self.received.values())

    def total_sent(self, site: int) -> int:
        return sum(self.sent.get(site, {}).values())

    def total_received(self, site: int) -> int:
        return sum(self.received.get(site, {}).values())


def secure_sum(
    updates: dict[int, np.ndarray],
    threshold: int,
    round_id: int,
    *,
    drop_after_advertise: Iterable[int] = (),
    drop_after_share: Iterable[int] = (),
    drop_after_mask: Iterable[int] = (),
    frac_bits: int = DEFAULT_FRAC_BITS,
) -> SecureSumResult:
    """Run the whole protocol in-process: the float64 sum of the updates of the sites that sent masked inputs.

    ``updates`` maps site id to its 1-D update (already weighted). Dropout is
    simulated: ``drop_after_advertise`` sites vanish before sharing keys,
    ``drop_after_share`` after sharing keys (their updates are left out of the
    sum), ``drop_after_mask`` after sending their masked input (their updates
    are in the sum; they just do not help unmask). Every message crosses a
    to_bytes/from_bytes boundary, so the byte counts in the result are what a
    transport carries (minus its own framing). Accuracy: each input is
    rounded to 2^-frac_bits, so ``total`` is within n_sites * 2^-frac_bits of
    the float sum. SecAggError for bad inputs or parameters and for too few
    sites left at any step.
    """
    if not updates:
        raise SecAggError("secure_sum needs at least one site's update.")
    ids = sorted(_check_site_id(i) for i in updates)
    if len(set(ids)) != len(ids):
        raise SecAggError("duplicate site ids in updates.")
    drops = [set(drop_after_advertise), set(drop_after_share), set(drop_after_mask)]
    unknown = set().union(*drops) - set(ids)
    if unknown:
        raise SecAggError(f"dropout lists name unknown sites {sorted(unknown)}.")
    first = np.asarray(updates[ids[0]])
    if first.ndim != 1:
        raise SecAggError(f"updates must be 1-D, site {ids[0]} has shape {first.shape}.")
    server = SecAggServer(len(ids), threshold, first.size, round_id, frac_bits)
    clients = {i: SecAggClient(i, round_id) for i in ids}
    sent = {i: dict.fromkeys(ROUNDS, 0) for i in ids}
    received = {i: dict.fromkeys(ROUNDS, 0) for i in ids}

    def wire(table: dict[int, dict[str, int]], site: int, round_name: str, msg):
        data = msg.to_bytes()
        table[site][round_name] += len(data)
        return type(msg).from_bytes(data)

    active = ids
    for i in active:
        server.receive_keys(wire(sent, i, "advertise_keys", clients[i].advertise_keys()))
    broadcast = server.broadcast_keys()
    active = [i for i in active if i not in drops[0]]
    for i in active:
        msg = clients[i].share_keys(wire(received, i, "advertise_keys", broadcast))
        server.receive_shares(wire(sent, i, "share_keys", msg))
    deliveries = server.deliver_shares()
    active = [i for i in active if i not in drops[1]]
    for i in active:
        msg = clients[i].masked_input(wire(received, i, "share_keys", deliveries[i]), updates[i])
        server.receive_masked_input(wire(sent, i, "masked_input", msg))
        del msg
    request = server.unmask_request()
    for i in active:
        if i not in drops[2]:
            msg = clients[i].unmask(wire(received, i, "unmask", request))
            server.receive_unmask(wire(sent, i, "unmask", msg))
    return SecureSumResult(server.result(), server.survivors, sent, received)
