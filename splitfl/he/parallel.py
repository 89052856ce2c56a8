"""CKKS on every core: worker processes that each hold one party's context.

SEAL's calls, through TenSEAL's bindings, hold Python's GIL (two threads encoding take as long as one doing
both), and TenSEAL's own ``n_threads`` only parallelises its high-level tensor operations, which these
protocols do not use. So a party uses more cores through processes: :class:`CKKSWorkers` starts ``workers``
processes (``spawn``: safe next to gRPC's threads), gives each the party's context once, and splits work over
ciphertexts among them. What crosses the pipes is what would cross the network anyway (SEAL bytes) or small
plaintext arrays, so a worker needs no state beyond its context and a cache of the plaintexts it encoded.

Each party's pool holds that party's context: the hospitals' pool the consortium's secret key (in processes of
the same hospital, over pipes, never on disk), the server's pool only the public context it already holds.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from .keys import SealEngine, engine_for
from .params import HEError

__all__ = ["CKKSWorkers", "resolve_workers"]


def resolve_workers(workers: int) -> int:
    """``workers`` as a process count: 0 means every core this process may run on."""
    if workers < 0:
        raise HEError(f"workers={workers}: give a number of processes (0 = every core, 1 = none)")
    if workers == 0:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return workers


# ----------------------------------------------------------------------------- inside a worker

_STATE: dict[str, Any] = {}


def _init(context: bytes) -> None:
    ctx = ts.context_from(context)
    _STATE.update(ctx=ctx, eng=engine_for(ctx), plains=OrderedDict())


def _engine() -> SealEngine:
    return _STATE["eng"]


def _ping() -> str:
    return _engine().fingerprint


def _encrypt_rows(rows: np.ndarray, scale: Optional[float]) -> list[bytes]:
    eng = _engine()
    return [eng.encrypt(r, scale) for r in rows]


def _decrypt_payloads(payloads: Sequence[bytes], what: str, check: Optional[Callable[..., None]]) -> np.ndarray:
    eng = _engine()
    out = []
    for i, data in enumerate(payloads):
        ct = eng.load_ciphertext(data, f"{what} #{i}")
        if check is not None:
            check(eng, ct, f"{what} #{i}")
        out.append(eng.decrypt(ct))
    return np.stack(out)


def _run(fn: Callable[..., Any], args: tuple) -> Any:
    """A task of a protocol module (``fn(engine, plaintext cache, *args)``), run with this worker's state."""
    return fn(_engine(), _STATE["plains"], *args)


# ----------------------------------------------------------------------------- the parent's side


class CKKSWorkers:
    """``workers`` processes holding ``ctx`` (its secret key too if it has one); close() or use as a context manager."""

    def __init__(self, ctx: ts.Context, workers: int) -> None:
        self.workers = resolve_workers(workers)
        if self.workers < 2:
            raise HEError("CKKSWorkers needs at least two processes; with one, run in this process (workers=None)")
        self.fingerprint = engine_for(ctx).fingerprint
        data = ctx.serialize(save_public_key=True, save_secret_key=bool(ctx.is_private()), save_galois_keys=True,
                             save_relin_keys=True)
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init, initargs=(data,))
        # start every worker now (imports and the context take a second or two), not inside the first step
        fps = [f.result() for f in [self._pool.submit(_ping) for _ in range(2 * self.workers)]]
        if set(fps) != {self.fingerprint}:
            raise HEError("a CKKS worker loaded another context than its parent's")

    def __enter__(self) -> CKKSWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def check(self, ctx: ts.Context) -> None:
        """HEError unless this pool holds ``ctx``'s key (a pool serves one party's context)."""
        if engine_for(ctx).fingerprint != self.fingerprint:
            raise HEError("these CKKS workers hold another context than the one this call computes under")

    def chunks(self, n: int) -> list[range]:
        """``range(n)`` cut into at most ``workers`` contiguous, near-equal, non-empty parts."""
        parts = min(self.workers, n)
        bounds = np.linspace(0, n, parts + 1).round().astype(int)
        return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def map(self, fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        """``fn(engine, plaintext_cache, *a)`` for each ``a`` in the workers, results in order (errors re-raised)."""
        futures = [self._pool.submit(_run, fn, a) for a in args]
        return [f.result() for f in futures]

    def encrypt(self, rows: np.ndarray, scale: Optional[float] = None) -> list[bytes]:
        """Seeded SEAL bytes of each row (``slots`` complex values), as :meth:`SealEngine.encrypt` makes them."""
        futures = [self._pool.submit(_encrypt_rows, rows[r.start:r.stop], scale) for r in self.chunks(len(rows))]
        return [ct for f in futures for ct in f.result()]

    def decrypt(self, payloads: Sequence[bytes], what: str,
                check: Optional[Callable[[SealEngine, sa.Ciphertext, str], None]] = None) -> np.ndarray:
        """(n, slots) complex values of the ciphertexts; ``check(engine, ct, what)`` (module-level) first."""
        blobs = [bytes(p) for p in payloads]
        futures = [self._pool.submit(_decrypt_payloads, blobs[r.start:r.stop], what, check)
                   for r in self.chunks(len(blobs))]
        return np.concatenate([f.result() for f in futures])


def cached_plaintexts(cache: OrderedDict, key: tuple, make: Callable[[], Any], versions: int = 4) -> Any:
    """A worker's plaintexts for ``key`` (weights' digest, which part), made once per weight version."""
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = make()
        while len(cache) > versions:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return hit


def digest(array: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()
