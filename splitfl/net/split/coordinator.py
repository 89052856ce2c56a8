"""The server's scheduling of a split run: sessions, turns, the epoch barrier, evaluations and the relay blob.

:class:`Coordinator` hands out training steps in exactly the in-process order
(:meth:`~splitfl.split.runner.SplitRunner.train_epoch`: round-robin over hospitals, skipping those without
batches left) through ``GetTurn``, skips a hospital silent past ``turn_timeout_s`` for the rest of the epoch,
holds the epoch barrier (``EndEpoch``), asks one live hospital to evaluate or (split-he-full) to release the
head, and keeps the sealed relay blob; :class:`_Sessions` checks each hospital's session and sequence numbers
against the replay window. It is plain state under one condition variable, with no network of its own: the
servicer's handlers and the server's epoch loop both drive it, and it refuses what comes out of order with
``_Abort`` errors that the servicer turns into gRPC statuses.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from typing import Any, Optional

import grpc

from splitfl.engine import RunError
from splitfl.net import DEFAULT_REPLAY_WINDOW, max_sequence_jump
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.split.common import _Abort, site_name


class _Sessions:
    def __init__(self, window: int = DEFAULT_REPLAY_WINDOW) -> None:
        self.window = window
        self.lock = threading.Lock()
        self.sessions: dict[int, bytes] = {}
        self.seen: dict[int, set[int]] = {}
        self.highest: dict[int, int] = {}
        self.nonces: set[bytes] = set()

    def open(self, site: int, nonce: bytes) -> bytes:
        with self.lock:
            if len(nonce) != 16:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "client_nonce must be 16 bytes")
            if nonce in self.nonces:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED, "Hello nonce seen before in this run")
            self.nonces.add(nonce)
            sid = os.urandom(16)
            self.sessions[site], self.seen[site], self.highest[site] = sid, set(), 0
            return sid

    def check(self, site: int, session: bytes, seq: int) -> None:
        with self.lock:
            if site not in self.sessions or session != self.sessions[site]:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_UNKNOWN_SESSION,
                             "unknown or replaced session: say Hello again")
            hi = self.highest[site]
            if seq < 1 or seq in self.seen[site] or seq <= hi - self.window:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED,
                             f"sequence {seq} already used or outside the replay window", highest_sequence=hi)

            jump = max_sequence_jump(self.window)
            if seq > hi + jump:  # would move the window past every genuine request still to come
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED,
                             f"sequence {seq} jumps more than {jump} ahead of the session's highest ({hi}); number "
                             "requests 1, 2, 3, ... within a session (or say Hello again for a new one)",
                             highest_sequence=hi)
            self.seen[site].add(seq)
            self.highest[site] = max(hi, seq)
            self.seen[site] = {s for s in self.seen[site] if s > self.highest[site] - self.window}


RELEASE = "release"  # the Coordinator's request kind for a split-he-full release (next to "val" / "test")


@dataclasses.dataclass
class _Eval:
    eval_id: int
    split: str
    site: int
    asked: float
    result: Optional[dict] = None
    info: dict = dataclasses.field(default_factory=dict)  # a release's epoch and validation AUROC


class Coordinator:
    """Turn-taking, the epoch barrier, evaluation requests and the sealed relay blob (all under one condition)."""

    def __init__(self, num_sites: int, relay: bool, close_on: str, *, turn_timeout_s: float = 300.0,
                 join_timeout_s: float = 600.0, eval_timeout_s: float = 600.0) -> None:
        self.num_sites, self.relay, self.close_on = num_sites, relay, close_on
        self.turn_timeout_s, self.join_timeout_s, self.eval_timeout_s = turn_timeout_s, join_timeout_s, eval_timeout_s
        self._lock = threading.RLock()  # one lock for all the state; the conditions below share it
        self.cond = threading.Condition(self._lock)  # the server's loops wait on it
        # Each hospital's GetTurn waits on its own condition (same lock), woken for its own turn or for what
        # concerns every hospital (an epoch, the end): a grant wakes one handler, not all N of them.
        self._site_conds: dict[int, threading.Condition] = {}
        self._waiting: dict[int, int] = {}  # GetTurn calls open per hospital
        self.phase = "starting"  # train | between | done
        self.epoch = 0
        self.counts: dict[int, int] = {}
        self.skipped: set[int] = set()
        self.ended: dict[int, tuple[float, int]] = {}
        self.open_step: Optional[tuple[int, int]] = None  # (step id, site)
        self.next_step = 1
        self.last_site = -1
        self.last_seen: dict[int, float] = {}
        self.eval: Optional[_Eval] = None
        self.next_eval = 1
        self.relay_version = 0
        self.relay_blob = b""
        self.done_seen: set[int] = set()
        self.epsilons: dict[int, float] = {}  # split-he DP: each hospital's spent epsilon, reported at EndEpoch
        self.log: list[tuple[int, int]] = []  # (epoch, site) of every granted step, for tests and logs
        # Per-step timings (the server's view, unix seconds): granted, closed (None: still open or timed out),
        # outcome, server_s (the head's compute in the step); run_split_server writes them to <out>/steps.csv
        # (read by bench/split_load.py).
        self.step_times: list[dict[str, Any]] = []
        # Every hospital has come to an epoch of this process: until then a missing one stops the run (it never
        # joined: a wrong address, credentials, or a join timeout shorter than its start-up); after, one that
        # goes silent is skipped for the epoch and training goes on.
        self.all_joined = False

    # ---------------------------------------------------------------- called by handlers (under self.cond)

    def seen(self, site: int) -> None:
        self.last_seen[site] = time.monotonic()

    def _site_cond(self, site: int) -> threading.Condition:
        cond = self._site_conds.get(site)
        if cond is None:
            cond = self._site_conds[site] = threading.Condition(self._lock)
        return cond

    def _wake(self, site: Optional[int] = None) -> None:
        """Wake the server's loops and the GetTurn of ``site`` (None: of every hospital); under self.cond."""
        self.cond.notify_all()
        for s, cond in self._site_conds.items():
            if site is None or s == site:
                cond.notify_all()

    def require_step(self, site: int, step: int) -> None:
        if self.open_step is None or self.open_step != (step, site):
            holder = f"step {self.open_step[0]} held by {site_name(self.open_step[1])}" if self.open_step else "no open step"
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         f"{site_name(site)} does not hold step {step} ({holder})", retry_after_ms=200)

    def close_step(self, site: int) -> None:
        self.counts[site] = max(0, self.counts.get(site, 0) - 1)
        self._time_step("closed")
        self.open_step = None
        self.cond.notify_all()

    def turn(self, site: int, epoch: int, batches_left: int, max_wait_ms: int) -> Any:
        deadline = time.monotonic() + min(max_wait_ms, 30_000) / 1000
        self._waiting[site] = self._waiting.get(site, 0) + 1  # a hospital waiting in GetTurn is not silent
        try:
            while True:
                self.seen(site)
                r = self._turn_once(site, epoch, batches_left)
                if r is not None or time.monotonic() >= deadline:
                    return r or pb.GetTurnResponse(state=pb.TURN_STATE_WAIT, epoch=self.epoch, retry_after_ms=200,
                                                   relay_version=self.relay_version)
                self._site_cond(site).wait(max(0.0, deadline - time.monotonic()))
        finally:
            self._waiting[site] -= 1
            self.seen(site)

    def _turn_once(self, site: int, epoch: int, batches_left: int) -> Any:
        base = {"epoch": self.epoch, "relay_version": self.relay_version}
        if self.phase == "done":
            self.done_seen.add(site)
            self.cond.notify_all()
            return pb.GetTurnResponse(state=pb.TURN_STATE_RUN_DONE, **base)
        ev = self.eval
        if ev is not None and ev.result is None and ev.site == site:
            if ev.split == RELEASE:
                return pb.GetTurnResponse(state=pb.TURN_STATE_RELEASE, eval_id=ev.eval_id, **ev.info, **base)
            return pb.GetTurnResponse(state=pb.TURN_STATE_EVALUATE, eval_split=ev.split, eval_id=ev.eval_id, **base)
        if self.phase == "train" and epoch < self.epoch:  # the site is behind: tell it the epoch at once
            return pb.GetTurnResponse(state=pb.TURN_STATE_WAIT, retry_after_ms=0, **base)
        if self.phase != "train" or epoch != self.epoch or site in self.ended:
            return None
        if site not in self.counts and site not in self.skipped:
            self.counts[site] = int(batches_left)
            self.cond.notify_all()
        if self.open_step is not None and self.open_step[1] == site:
            return pb.GetTurnResponse(state=pb.TURN_STATE_YOURS, step=self.open_step[0], **base)
        if site in self.skipped or self.counts.get(site, 0) == 0:
            return pb.GetTurnResponse(state=pb.TURN_STATE_EPOCH_DONE, **base)
        return None

    def end_epoch(self, site: int, epoch: int, loss_sum: float, samples: int, epsilon: float = 0.0) -> Any:
        if self.phase != "train" or epoch != self.epoch or site in self.ended:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         f"epoch {epoch} is not open for {site_name(site)} (server epoch {self.epoch}, {self.phase})")
        if site not in self.skipped and self.counts.get(site, 1) > 0:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER,
                         f"{site_name(site)} still has {self.counts.get(site)} step(s) in epoch {epoch}")
        if not (math.isfinite(loss_sum) and samples >= 0):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "loss_sum must be finite")
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD, "epsilon must be finite and >= 0")
        self.ended[site] = (float(loss_sum), int(samples)) if site not in self.skipped else (0.0, 0)
        self.epsilons[site] = max(self.epsilons.get(site, 0.0), float(epsilon))  # spent privacy never shrinks
        self.cond.notify_all()
        pending = [s for s in self.counts if s not in self.ended and s not in self.skipped]
        return len(pending)

    # ---------------------------------------------------------------- called by the server's runner

    def server_time(self, seconds: float) -> None:
        """The head's compute in the open step (forward / backward / update), for steps.csv's server_s."""
        with self.cond:
            if self.step_times and self.step_times[-1]["outcome"] == "open":
                self.step_times[-1]["server_s"] += seconds

    def _time_step(self, outcome: str) -> None:
        if self.step_times and self.step_times[-1]["outcome"] == "open":
            self.step_times[-1].update(closed=time.time(), outcome=outcome)

    def _stale(self, site: int, timeout: float) -> bool:
        if self._waiting.get(site, 0) > 0:  # its GetTurn is open: it is there, waiting to be woken
            return False
        return time.monotonic() - self.last_seen.get(site, 0.0) > timeout

    def run_epoch(self, epoch: int) -> tuple[float, int, list[int]]:
        """Coordinate one training epoch; returns (loss sum, samples, skipped sites).

        Raises RunError, before anything is trained or recorded, when a hospital never joined this server (the
        first epoch it runs waits ``join_timeout_s`` for all of them) or when no hospital came to the epoch at
        all, and after it when the epoch trained no sample: an empty epoch is never handed to the checkpoint.
        """
        with self.cond:
            self.phase, self.epoch = "train", epoch
            self.counts, self.skipped, self.ended = {}, set(), {}
            self.open_step, self.last_site = None, -1
            self._wake()
            started = time.monotonic()
            deadline = started + self.join_timeout_s
            while len(self.counts) < self.num_sites and time.monotonic() < deadline:
                self.cond.wait(0.2)
            missing = sorted(set(range(self.num_sites)) - set(self.counts))
            if missing and (not self.all_joined or len(missing) == self.num_sites):
                self._stop_epoch()
                names = ", ".join(site_name(s) for s in missing)
                came = ", ".join(site_name(s) for s in sorted(self.counts)) or "none"
                what = "never joined" if not self.all_joined else "did not come back"
                raise RunError(
                    f"hospital(s) {names} {what}: waited {time.monotonic() - started:.0f} s (join timeout "
                    f"{self.join_timeout_s:g} s) for all {self.num_sites} hospitals before epoch {epoch + 1}; "
                    f"came: {came}. Nothing was trained or recorded for epoch {epoch + 1}. Start the missing "
                    "hospitals (`splitfl join --site N ...`, same config, this server's address) and rerun with "
                    "the same --out, or give them longer to start with --join-timeout (join_timeout_s)")
            self.all_joined = True
            self.skipped |= set(missing)
            while True:
                if self.open_step is None:
                    nxt = self._next_site()
                    if nxt is None:
                        break
                    self.open_step = (self.next_step, nxt)
                    self.next_step += 1
                    self.last_site = nxt
                    self.log.append((epoch, nxt))
                    self.step_times.append({"epoch": epoch, "step": self.open_step[0], "site": nxt,
                                            "granted": time.time(), "closed": None, "outcome": "open", "server_s": 0.0})
                    self.last_seen.setdefault(nxt, time.monotonic())
                    self._wake(nxt)
                else:
                    holder = self.open_step[1]
                    if self._stale(holder, self.turn_timeout_s):
                        self.skipped.add(holder)  # gone: the rest of the epoch goes on without it
                        self._time_step("timeout")
                        self.open_step = None
                        continue
                    self.cond.wait(0.2)
            while True:
                pending = [s for s in self.counts if s not in self.ended and s not in self.skipped]
                if not pending:
                    break
                for s in pending:
                    if self._stale(s, self.turn_timeout_s):
                        self.skipped.add(s)
                self.cond.wait(0.2)
            self.phase = "between"
            self._wake()
            loss = sum(v[0] for v in self.ended.values())
            samples = sum(v[1] for v in self.ended.values())
            if samples == 0:
                gone = ", ".join(site_name(s) for s in sorted(self.skipped)) or "none"
                raise RunError(
                    f"epoch {epoch + 1} trained no sample: no hospital finished its steps (skipped as silent for "
                    f"{self.turn_timeout_s:g} s: {gone}); refusing to record an empty epoch. Check the hospitals' "
                    "logs, restart them and rerun the server with the same --out to resume from the last checkpoint")
            return loss, samples, sorted(self.skipped)

    def _stop_epoch(self) -> None:
        """Close an epoch that will not run (under self.cond): no turn is granted, hospitals wait."""
        self.phase = "between"
        self.open_step = None
        self._wake()

    def _next_site(self) -> Optional[int]:
        for k in range(1, self.num_sites + 1):
            s = (self.last_site + k) % self.num_sites
            if s not in self.skipped and self.counts.get(s, 0) > 0:
                return s
        return None

    def evaluate(self, split: str, **info: Any) -> dict:
        """Ask one live hospital to evaluate ``split`` ("val", "test") or, split-he-full, to release the head
        (``split`` = :data:`RELEASE`, ``info`` the GetTurnResponse release fields); its ReportEval answer."""
        with self.cond:
            tried: set[int] = set()
            while True:
                live = [s for s in range(self.num_sites)
                        if s not in tried and not self._stale(s, self.turn_timeout_s)] or \
                       [s for s in range(self.num_sites) if s not in tried]
                if not live:
                    raise RuntimeError(f"no hospital evaluated the {split} split")
                ev = _Eval(self.next_eval, split, live[0], time.monotonic(), info=info)
                self.next_eval += 1
                self.eval = ev
                self._wake(ev.site)
                while ev.result is None and time.monotonic() - ev.asked < self.eval_timeout_s:
                    self.cond.wait(0.2)
                self.eval = None
                if ev.result is not None:
                    return ev.result
                tried.add(ev.site)

    def report_eval(self, site: int, eval_id: int, metrics: dict) -> bool:
        ev = self.eval
        if ev is None or ev.eval_id != eval_id or ev.site != site or ev.result is not None:
            return False
        ev.result = metrics
        self.cond.notify_all()
        return True

    def finish(self, grace_s: float) -> None:
        with self.cond:
            self.phase = "done"
            self._wake()
            deadline = time.monotonic() + grace_s
            while len(self.done_seen) < self.num_sites and time.monotonic() < deadline:
                self.cond.wait(0.2)
