"""What CKKS itself must spend on a protocol step: count its primitives, time each one, add them up.

:class:`OpCounter` wraps the SEAL objects of one or more :class:`~splitfl.he.keys.SealEngine` while it is
active and counts every primitive the real protocol code calls through them (encode, encrypt, ciphertext x
plaintext, ciphertext x ciphertext, relinearise, rescale, rotate, add, mod-switch, decrypt, decode,
serialise, deserialise), keyed by the operand's level and size, which their cost depends on.
:func:`time_primitives` then times each counted primitive alone, on operands of the same level and size
under the same parameters, and :func:`floor_seconds` adds ``count x unit cost``: the step's floor. A step
that runs close to its floor spends its time in SEAL, not in Python, packing or checks.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import tenseal.sealapi as sa

from .keys import SealEngine

__all__ = ["OpCounter", "OpKey", "PRIMITIVES", "floor_seconds", "format_counts", "time_primitives"]

# The primitives, in the order tables print them.
PRIMITIVES = ("encode", "encrypt", "encrypt_public", "ct_x_pt", "ct_x_ct", "relinearize", "rescale", "rotate",
              "add", "mod_switch", "decrypt", "decode", "serialise", "deserialise")

_EVALUATOR = {
    "multiply_plain": "ct_x_pt", "multiply_plain_inplace": "ct_x_pt",
    "multiply": "ct_x_ct", "multiply_inplace": "ct_x_ct",
    "relinearize": "relinearize", "relinearize_inplace": "relinearize",
    "rescale_to_next": "rescale", "rescale_to_next_inplace": "rescale",
    "rotate_vector": "rotate", "rotate_vector_inplace": "rotate",
    "add": "add", "add_inplace": "add", "sub": "add", "sub_inplace": "add",
    "add_plain": "add", "add_plain_inplace": "add", "sub_plain": "add", "sub_plain_inplace": "add",
    "mod_switch_to_next": "mod_switch", "mod_switch_to_next_inplace": "mod_switch",
    "mod_switch_to": "mod_switch", "mod_switch_to_inplace": "mod_switch",
}


@dataclass(frozen=True, order=True)
class OpKey:
    """One kind of primitive call: what, at which level (chain index), on how many polynomials, seeded or not."""

    primitive: str
    level: int
    size: int = 2
    seeded: bool = False

    def label(self) -> str:
        extra = f", {self.size} polys" if self.size != 2 else ""
        return f"{self.primitive} (level {self.level}{extra}{', seeded' if self.seeded else ''})"


class _Proxy:
    """Forwards every attribute to a SEAL object; the methods named in ``table`` are counted first."""

    def __init__(self, target: Any, record: Callable[[str, tuple], None], table: dict[str, str]) -> None:
        self._target, self._record, self._table = target, record, table

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        primitive = self._table.get(name)
        if primitive is None:
            return attr

        def counted(*args: Any) -> Any:
            self._record(primitive, args)
            return attr(*args)

        return counted


class OpCounter:
    """Context manager: counts the CKKS primitives run through ``engines`` (their own code, unchanged)."""

    def __init__(self, *engines: SealEngine) -> None:
        self.engines = engines
        self.counts: Counter[OpKey] = Counter()
        self.load_samples: dict[OpKey, list[bytes]] = {}  # payloads per deserialise key, to time it alone
        self._saved: list[tuple[SealEngine, dict[str, Any]]] = []

    # -- what an operand is --------------------------------------------------
    @staticmethod
    def _level(eng: SealEngine, obj: Any) -> int:
        return eng.context.get_context_data(obj.parms_id()).chain_index()

    def _record(self, eng: SealEngine, primitive: str, args: tuple) -> None:
        if primitive == "encode":  # encode(values, [parms_id,] scale, plain)
            level = self._level_of_parms(eng, args[1]) if len(args) == 4 else eng.levels
            self.counts[OpKey("encode", level, 0)] += 1
        elif primitive in ("encrypt", "encrypt_public"):
            level = self._level(eng, args[0]) if primitive == "encrypt" else self._level_of_parms(eng, args[0])
            self.counts[OpKey(primitive, level, 2, primitive == "encrypt")] += 1
        elif primitive == "decode":
            self.counts[OpKey("decode", self._level(eng, args[0]), 0)] += 1
        else:  # ciphertext operations: the first argument is the ciphertext operated on
            ct = args[0]
            self.counts[OpKey(primitive, self._level(eng, ct), ct.size())] += 1

    @staticmethod
    def _level_of_parms(eng: SealEngine, parms_id: Any) -> int:
        return eng.context.get_context_data(parms_id).chain_index()

    def _patch(self, eng: SealEngine) -> None:
        saved = {name: eng.__dict__[name] for name in ("evaluator", "encoder", "_encryptor", "_decryptor",
                                                        "_zero_encryptor")}
        self._saved.append((eng, saved))

        def rec(primitive: str, args: tuple) -> None:
            self._record(eng, primitive, args)

        eng.evaluator = _Proxy(saved["evaluator"], rec, _EVALUATOR)  # type: ignore[assignment]
        eng.encoder = _Proxy(saved["encoder"], rec, {"encode": "encode", "decode_complex": "decode"})  # type: ignore
        if saved["_encryptor"] is not None:
            eng._encryptor = _Proxy(saved["_encryptor"], rec, {"encrypt_symmetric": "encrypt"})  # type: ignore
        if saved["_decryptor"] is not None:
            eng._decryptor = _Proxy(saved["_decryptor"], rec, {"decrypt": "decrypt"})  # type: ignore
        eng.encrypt_zero(eng.first_parms_id, eng.scale)  # builds the public-key encryptor, so it can be wrapped
        eng._zero_encryptor = _Proxy(eng.__dict__["_zero_encryptor"], rec, {"encrypt_zero": "encrypt_public"})  # type: ignore
        real_save, real_load = eng.save, eng.load_ciphertext

        def save(obj: Any) -> bytes:
            if type(obj).__name__ == "SerializableCiphertext":  # a fresh symmetric encryption: seeded, top level
                self.counts[OpKey("serialise", eng.levels, 2, True)] += 1
            elif isinstance(obj, sa.Ciphertext):
                self.counts[OpKey("serialise", self._level(eng, obj), obj.size())] += 1
            return real_save(obj)

        def load(data: bytes, what: str) -> sa.Ciphertext:
            ct = real_load(data, what)
            key = OpKey("deserialise", self._level(eng, ct), ct.size(), _is_seeded(ct, data))
            self.counts[key] += 1
            samples = self.load_samples.setdefault(key, [])
            if len(samples) < ROTATION:
                samples.append(bytes(data))
            return ct

        eng.save, eng.load_ciphertext = save, load  # type: ignore[method-assign]

    def __enter__(self) -> "OpCounter":
        for eng in self.engines:
            self._patch(eng)
        return self

    def __exit__(self, *exc: object) -> None:
        for eng, saved in reversed(self._saved):
            eng.__dict__.update(saved)
            del eng.save, eng.load_ciphertext  # back to the class's methods
        self._saved.clear()


def _is_seeded(ct: sa.Ciphertext, data: bytes) -> bool:
    """A seeded ciphertext stores one polynomial and a seed: about half the bytes of its unseeded form."""
    words = ct.size() * ct.coeff_modulus_size() * ct.poly_modulus_degree()
    return ct.size() == 2 and len(data) < 0.6 * 8 * words  # unseeded: >= ~0.8 of it after zstd; seeded: ~0.45


# ----------------------------------------------------------------------------- unit costs


ROTATION = 16  # distinct operands each primitive is timed on, in turn (a step's working set is many ciphertexts)


def _median_time(fn: Callable[[int], Any], repeats: int) -> float:
    fn(0)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Operands:
    """Random operands of a given level and size under one (secret) engine."""

    def __init__(self, eng: SealEngine) -> None:
        self.eng = eng
        self.rng = np.random.default_rng(0)
        self.parms = {}
        data = eng.context.first_context_data()
        while data is not None:
            self.parms[data.chain_index()] = data.parms_id()
            data = data.next_context_data()

    def values(self) -> list:
        return (self.rng.normal(size=self.eng.slots) + 1j * self.rng.normal(size=self.eng.slots)).tolist()

    def plain(self, level: int) -> sa.Plaintext:
        return self.eng.encode(np.asarray(self.values()), self.parms[level], self.eng.scale)

    def cipher(self, level: int, size: int = 2) -> sa.Ciphertext:
        ct = self.eng.load_ciphertext(self.eng.encrypt(np.asarray(self.values())), "operand")
        if size == 3:
            other = self.eng.load_ciphertext(self.eng.encrypt(np.asarray(self.values())), "operand")
            self.eng.evaluator.multiply_inplace(ct, other)
        if level != self.eng.levels:
            self.eng.evaluator.mod_switch_to_inplace(ct, self.parms[level])
        return ct

    def many(self, make: Callable[[], Any], n: int = ROTATION) -> list[Any]:
        return [make() for _ in range(n)]


def _call_of(key: OpKey, eng: SealEngine, ops: _Operands, relin: Optional[sa.RelinKeys],
             galois: Optional[sa.GaloisKeys], rotation_step: int,
             load_samples: dict[OpKey, list[bytes]]) -> Optional[Callable[[int], Any]]:
    """Call ``i`` of ``key``'s primitive, on the ``i``-th of distinct operands of its level and size, taken in turn.

    None when a needed key is missing.
    """
    lv, size, p, ev, r = key.level, key.size, key.primitive, eng.evaluator, ROTATION
    if p == "encode":
        vals, parms = ops.many(ops.values), ops.parms[lv]
        return lambda i: eng.encoder.encode(vals[i % r], parms, eng.scale, sa.Plaintext())
    if p == "encrypt":
        pts = ops.many(lambda: ops.plain(lv))
        return lambda i: eng._encryptor.encrypt_symmetric(pts[i % r])  # type: ignore[union-attr]
    if p == "encrypt_public":
        eng.encrypt_zero(ops.parms[lv], eng.scale)  # builds the public-key encryptor
        return lambda i: eng._zero_encryptor.encrypt_zero(ops.parms[lv], sa.Ciphertext())  # type: ignore[union-attr]
    if p == "ct_x_pt":
        cts, pts = ops.many(lambda: ops.cipher(lv, size)), ops.many(lambda: ops.plain(lv))
        return lambda i: ev.multiply_plain(cts[i % r], pts[(i * 7) % r], sa.Ciphertext())
    if p == "ct_x_ct":
        cts = ops.many(lambda: ops.cipher(lv))
        return lambda i: ev.multiply(cts[i % r], cts[(i * 7 + 1) % r], sa.Ciphertext())
    if p == "relinearize":
        cts3 = ops.many(lambda: ops.cipher(lv, 3))
        return None if relin is None else (lambda i: ev.relinearize(cts3[i % r], relin, sa.Ciphertext()))
    if p == "rotate":
        cts = ops.many(lambda: ops.cipher(lv, size))
        return None if galois is None else (lambda i: ev.rotate_vector(cts[i % r], rotation_step, galois,
                                                                         sa.Ciphertext()))
    if p in ("rescale", "mod_switch"):
        cts = ops.many(lambda: ops.cipher(lv, size))
        op = ev.rescale_to_next if p == "rescale" else ev.mod_switch_to_next
        return lambda i: op(cts[i % r], sa.Ciphertext())
    if p == "add":
        cts = ops.many(lambda: ops.cipher(lv, size))
        return lambda i: ev.add(cts[i % r], cts[(i * 7 + 1) % r], sa.Ciphertext())
    if p == "decrypt":
        cts = ops.many(lambda: ops.cipher(lv, size))
        return lambda i: eng._decryptor.decrypt(cts[i % r], sa.Plaintext())  # type: ignore[union-attr]
    if p == "decode":
        pts = []
        for ct in ops.many(lambda: ops.cipher(lv)):
            pts.append(sa.Plaintext())
            eng._decryptor.decrypt(ct, pts[-1])  # type: ignore[union-attr]
        return lambda i: eng.encoder.decode_complex(pts[i % r])
    if p == "serialise":
        objs: list[Any] = ops.many(lambda: eng._encryptor.encrypt_symmetric(ops.plain(lv)) if key.seeded  # type: ignore
                                   else ops.cipher(lv, size))
        return lambda i: eng.save(objs[i % r])
    if p == "deserialise":
        data = load_samples.get(key) or [eng.save(ct) for ct in ops.many(lambda: ops.cipher(lv, size))]
        return lambda i: eng.load_ciphertext(data[i % len(data)], "timed")
    return None


def time_primitives(eng: SealEngine, keys: Iterable[OpKey], *, relin: Optional[sa.RelinKeys] = None,
                    galois: Optional[sa.GaloisKeys] = None, rotation_step: int = 1,
                    load_samples: Optional[dict[OpKey, list[bytes]]] = None, repeats: int = 48) -> dict[OpKey, float]:
    """Seconds per call of each primitive in ``keys`` alone (median of ``repeats``), under ``eng``'s parameters.

    Each primitive runs on :data:`ROTATION` distinct operands in turn, as a protocol step touches many
    ciphertexts: the same operand over and over stays in the CPU's cache and runs ~15 % faster than any step
    can. ``eng`` must hold the secret key (it makes the operands). Relinearisation and rotation need the keys
    the protocol's server holds (skipped without them); ``load_samples`` (from :class:`OpCounter`) are the very
    payloads deserialised.
    """
    if not eng.private:
        raise ValueError("time_primitives needs a secret engine to make its operands")
    ops, out = _Operands(eng), {}
    for key in sorted(set(keys)):
        call = _call_of(key, eng, ops, relin, galois, rotation_step, load_samples or {})
        if call is not None:
            out[key] = _median_time(call, repeats)
    return out


def floor_seconds(counts: Counter[OpKey] | dict[OpKey, int], unit: dict[OpKey, float]) -> float:
    """sum of count x unit cost; a primitive without a unit cost (no key to time it) raises."""
    missing = [k.label() for k in counts if k not in unit]
    if missing:
        raise KeyError(f"no unit cost for {missing}")
    return sum(n * unit[k] for k, n in counts.items())


def format_counts(counts: Counter[OpKey] | dict[OpKey, int], unit: dict[OpKey, float]) -> list[dict[str, Any]]:
    """JSON rows: primitive, level, size, seeded, count, unit ms, total ms (the floor's terms)."""
    return [{"primitive": k.primitive, "level": k.level, "size": k.size, "seeded": k.seeded, "count": n,
             "unit_ms": unit[k] * 1e3, "total_ms": n * unit[k] * 1e3}
            for k, n in sorted(counts.items(), key=lambda kv: (PRIMITIVES.index(kv[0].primitive), kv[0]))]
