"""One FedAvg aggregation round, plaintext vs CKKS-encrypted (whole model or chosen layers).

Everything runs in one process on the same updates: K sites, each with a
random model delta (N(0, 0.01^2), float32) of every trainable parameter of a
timm model and a sample count; each variant is run once per repeat, in turn,
and each time is the median over the repeats.

* plaintext: each site serialises its flat update as a split-plain tensor
  message (``splitfl.tensors``, float32); the server parses them,
  computes the weighted mean and the new global model and serialises it
  once; each site parses the model it receives;
* HE, all parameters: each site :func:`~splitfl.he.aggregation.encrypt_update`,
  the server :func:`~splitfl.he.aggregation.sum_encrypted` (public context
  only), each site receives the encrypted aggregate and
  :func:`~splitfl.he.aggregation.decrypt_aggregate` (every site is a key
  holder) and applies the mean to its copy of the global model;
* HE, chosen layers (NVFlare-style partial encryption): only the parameters
  whose names match the prefixes are encrypted, the rest travel as the
  plaintext variant's tensor messages; the server sends the encrypted
  aggregate and the plaintext part of the new model.

Sites run in parallel in a deployment, so the round time reported is the
critical path: the slowest site's upload work + the server + one site's
download work (every site does the same in parallel); the sequential time of
this process is in the JSON. Network time is not included: the byte counts
are per site, up and down.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
import timm
import torch

from splitfl.artifacts import write_json
from splitfl.he.aggregation import (
    AGGREGATION_PRESET,
    capacity,
    decrypt_aggregate,
    encrypt_update,
    error_bound,
    sum_encrypted,
    values_per_ciphertext,
)
from splitfl.he.keys import create_secret_context, load_public_context, public_context_bytes
from splitfl.he.params import get_preset
from splitfl.tensors import tensor_from_bytes, tensor_to_bytes

__all__ = ["DEFAULT_PARTIAL", "format_table", "main", "run_benchmark"]

# Layer groups encrypted in the partial variants: "+"-joined name prefixes.
DEFAULT_PARTIAL = ("layer4.+fc.", "fc.")


@dataclass
class _Variant:
    name: str
    mask: np.ndarray | None  # which flat values are encrypted; None: plaintext only


def _flat_parameters(model_name: str, num_classes: int) -> tuple[list[tuple[str, int]], np.ndarray]:
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1).float() for _, p in named]).numpy().copy()
    return [(n, p.numel()) for n, p in named], flat


def _mask(layout: list[tuple[str, int]], prefixes: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.full(size, any(n.startswith(p) for p in prefixes)) for n, size in layout])


def _plain_mean(messages: list[bytes], counts: list[float], size: int, what: str) -> torch.Tensor:
    """Server: parse the sites' float32 tensor messages and compute sum_k n_k x_k / sum_k n_k (float32)."""
    total = float(sum(counts))
    acc = torch.zeros(size, dtype=torch.float32)
    for msg, n in zip(messages, counts):
        acc.add_(tensor_from_bytes(msg, what, (size,)), alpha=n / total)
    return acc


def _run_round(
    variant: _Variant,
    secret: ts.Context,
    public: ts.Context,
    updates: list[np.ndarray],
    counts: list[float],
    global_model: np.ndarray,
) -> dict[str, Any]:
    """One round of one variant: per-site upload times, server time, one site's download time, bytes, result."""
    mask = variant.mask
    enc_len = 0 if mask is None else int(mask.sum())
    plain_len = global_model.size - enc_len
    enc_idx = slice(None) if enc_len == global_model.size else mask  # whole model: no gather copy
    up_times, ups = [], []
    for x, n in zip(updates, counts):  # site side: each site in turn
        t0 = time.perf_counter()
        if mask is None:
            msg = (None, tensor_to_bytes(torch.from_numpy(x)))
        else:
            enc = encrypt_update(secret, x[enc_idx], n)
            msg = (enc, tensor_to_bytes(torch.from_numpy(x[~mask])) if plain_len else None)
        up_times.append(time.perf_counter() - t0)
        ups.append(msg)

    t0 = time.perf_counter()  # server
    agg = sum_encrypted(public, [m[0] for m in ups], enc_len) if enc_len else None
    plain_down = None
    if plain_len:
        mean = _plain_mean([m[1] for m in ups], counts, plain_len, "site update")
        g = torch.from_numpy(global_model if mask is None else global_model[~mask])
        plain_down = tensor_to_bytes(g + mean)  # the new global model's plaintext part, sent to every site
    server_time = time.perf_counter() - t0

    t0 = time.perf_counter()  # one site receives (every site does the same, in parallel)
    new_model = global_model.copy()
    he_mean = None
    if agg is not None:
        he_mean, _ = decrypt_aggregate(secret, agg, enc_len)
        new_model[enc_idx] += he_mean.astype(np.float32)
    if plain_down is not None:
        received = tensor_from_bytes(plain_down, "global model", (plain_len,)).numpy()
        if mask is None:
            new_model = received
        else:
            new_model[~mask] = received
    down_time = time.perf_counter() - t0

    up_bytes = [sum(len(p) for p in m if p is not None) for m in ups]
    down_bytes = (len(agg) if agg is not None else 0) + (len(plain_down) if plain_down is not None else 0)
    return {
        "site_up_s": up_times,
        "server_s": server_time,
        "site_down_s": down_time,
        "up_bytes": up_bytes,
        "down_bytes": down_bytes,
        "he_mean": he_mean,
        "new_model": new_model,
    }


def run_benchmark(
    model: str = "resnet18",
    sites: int = 4,
    repeats: int = 3,
    partial: Sequence[str] = DEFAULT_PARTIAL,
    num_classes: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure every variant; returns the JSON-ready result dict (times in seconds, sizes in bytes)."""
    if sites < 1 or repeats < 1:
        raise ValueError("--sites and --repeats must be >= 1")
    params = get_preset(AGGREGATION_PRESET)
    layout, global_model = _flat_parameters(model, num_classes)
    size = global_model.size
    rng = np.random.default_rng(seed)
    counts = [float(c) for c in rng.integers(100, 5000, size=sites)]
    updates = [(rng.standard_normal(size, dtype=np.float32) * np.float32(0.01)).clip(-1, 1) for _ in range(sites)]
    total = sum(counts)
    exact_mean = sum(np.float64(n) * x.astype(np.float64) for n, x in zip(counts, updates)) / total
    exact_model = global_model.astype(np.float64) + exact_mean

    t0 = time.perf_counter()
    secret = create_secret_context(params)
    public = load_public_context(public_context_bytes(secret))
    keygen = time.perf_counter() - t0

    variants = [_Variant("plaintext", None), _Variant("HE: all parameters", np.ones(size, dtype=bool))]
    for spec in partial:
        prefixes = [p for p in spec.split("+") if p]
        m = _mask(layout, prefixes)
        if not m.any():
            raise ValueError(f"--partial {spec!r}: no parameter of {model} starts with {prefixes}")
        variants.append(_Variant("HE: " + " + ".join(f"{p}*" for p in prefixes), m))

    # warm-up: engines, scratch files, allocator (the smallest encrypted variant, untimed)
    smallest = min(variants[1:], key=lambda v: int(v.mask.sum()))  # type: ignore[union-attr]
    _run_round(smallest, secret, public, updates, counts, global_model)

    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for rep in range(repeats):
        for v in variants if rep % 2 == 0 else variants[::-1]:
            r = _run_round(v, secret, public, updates, counts, global_model)
            r["max_abs_error"] = float(np.abs(r.pop("new_model").astype(np.float64) - exact_model).max())
            he_mean = r.pop("he_mean")
            if he_mean is not None:
                r["he_mean_max_abs_error"] = float(np.abs(he_mean - exact_mean[v.mask]).max())
            del he_mean
            runs[v.name].append(r)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        rs = runs[v.name]
        up = med([max(r["site_up_s"]) for r in rs])
        server = med([r["server_s"] for r in rs])
        down = med([r["site_down_s"] for r in rs])
        enc = 0 if v.mask is None else int(v.mask.sum())
        rows[v.name] = {
            "encrypted_values": enc,
            "encrypted_fraction": enc / size,
            "ciphertexts_per_site": math.ceil(enc / values_per_ciphertext(secret)) if enc else 0,
            "site_up_s": up,  # slowest site: serialise / encrypt (+ serialise the plaintext part)
            "site_up_s_mean": med([statistics.mean(r["site_up_s"]) for r in rs]),
            "server_s": server,
            "site_down_s": down,
            "round_s": med([max(r["site_up_s"]) + r["server_s"] + r["site_down_s"] for r in rs]),
            "sequential_s": med([sum(r["site_up_s"]) + r["server_s"] + sites * r["site_down_s"] for r in rs]),
            "up_bytes_per_site": statistics.mean(rs[-1]["up_bytes"]),
            "down_bytes_per_site": rs[-1]["down_bytes"],
            "max_abs_error": max(r["max_abs_error"] for r in rs),
            "he_mean_max_abs_error": max((r.get("he_mean_max_abs_error", 0.0) for r in rs), default=0.0),
            "all_round_s": [max(r["site_up_s"]) + r["server_s"] + r["site_down_s"] for r in rs],
        }
    base = rows["plaintext"]
    for row in rows.values():
        row["x_plain_time"] = row["round_s"] / base["round_s"]
        row["x_plain_up_bytes"] = row["up_bytes_per_site"] / base["up_bytes_per_site"]
        row["x_plain_down_bytes"] = row["down_bytes_per_site"] / base["down_bytes_per_site"]

    full = rows["HE: all parameters"]
    return {
        "he_to_plain_time": full["x_plain_time"],
        "he_to_plain_up_bytes": full["x_plain_up_bytes"],
        "he_to_plain_down_bytes": full["x_plain_down_bytes"],
        "he_max_abs_error": full["he_mean_max_abs_error"],
        "variants": rows,
        "model": {"name": model, "num_classes": num_classes, "parameters": size, "tensors": len(layout)},
        "sites": {"n": sites, "counts": counts, "update": "N(0, 0.01^2) float32 per parameter"},
        "params": {
            "preset": params.name,
            "poly_modulus_degree": params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
            "scale_bits": params.scale_bits,
            "values_per_ciphertext": values_per_ciphertext(secret),
            "capacity": capacity(params),
            "error_bound_of_mean": error_bound(params, sites, total) / total,
            "keygen_s": keygen,
            "public_context_bytes": len(public_context_bytes(secret)),
        },
        "config": {
            "repeats": repeats,
            "statistic": "median over repeats (variants interleaved, order alternating), after one untimed warm-up",
            "round_s": "slowest site's upload work + server + one site's download work (sites run in parallel)",
            "sequential_s": "all sites' upload work + server + every site's download work, as in this process",
            "partial": list(partial),
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "tenseal": ts.__version__,
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        },
    }


def format_table(r: dict[str, Any]) -> str:
    """Readable table of a :func:`run_benchmark` result."""
    m, p, s = r["model"], r["params"], r["sites"]
    head = (
        f"{'variant':26s} {'encrypted':>9s} {'site up s':>9s} {'server s':>9s} {'site dn s':>9s} {'round s':>8s} "
        f"{'x plain':>8s} {'up MB/site':>10s} {'x plain':>7s} {'dn MB/site':>10s} {'x plain':>7s} {'model err':>9s} "
        f"{'HE mean err':>11s}"
    )
    lines = [
        (
            f"FedAvg round: {m['name']} (num_classes={m['num_classes']}), {m['parameters']:,} float32 parameters, "
            f"{s['n']} sites (counts {', '.join(f'{c:g}' for c in s['counts'])})"
        ),
        (
            f"CKKS {p['preset']!r}: N={p['poly_modulus_degree']}, {p['coeff_mod_bit_sizes']}, "
            f"scale 2^{p['scale_bits']}, {p['values_per_ciphertext']} values per ciphertext, "
            f"capacity |sum n_k x| <= {p['capacity']:.3g}"
        ),
        head,
        "-" * len(head),
    ]
    for name, row in r["variants"].items():
        he_err = f"{row['he_mean_max_abs_error']:11.1e}" if row["encrypted_values"] else f"{'-':>11s}"
        lines.append(
            f"{name:26s} {row['encrypted_fraction'] * 100:8.2f}% {row['site_up_s']:9.3f} {row['server_s']:9.3f} "
            f"{row['site_down_s']:9.3f} {row['round_s']:8.3f} {row['x_plain_time']:7.1f}x "
            f"{row['up_bytes_per_site'] / 1e6:10.2f} {row['x_plain_up_bytes']:6.2f}x "
            f"{row['down_bytes_per_site'] / 1e6:10.2f} {row['x_plain_down_bytes']:6.2f}x {row['max_abs_error']:9.1e} "
            f"{he_err}"
        )
    c = r["config"]
    lines += [
        "",
        "site up: slowest site's serialise/encrypt; server: check + sum (+ plaintext mean and new model);",
        "site dn: one site's decrypt/parse + apply;",
        "round = site up + server + site dn (sites work in parallel; this process's sequential time is in the JSON).",
        "model err: the new global model (float32) vs the exact float64 FedAvg (float32 rounding of the weights);",
        f"HE mean err: the decrypted mean update vs the exact mean (bound {p['error_bound_of_mean']:.1e}).",
        (
            f"Times: median of {c['repeats']} interleaved repeats after a warm-up; one process, "
            f"{r['environment']['torch_threads']} torch thread(s); network time not included."
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    parser.add_argument("--model", default="resnet18", help="timm model name (default resnet18)")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (median)")
    parser.add_argument(
        "--partial",
        nargs="*",
        default=list(DEFAULT_PARTIAL),
        help="layer groups for partial encryption, each '+'-joined name prefixes (default: layer4.+fc. fc.)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_benchmark(
        model=args.model,
        sites=args.sites,
        repeats=args.repeats,
        partial=args.partial,
        num_classes=args.num_classes,
        seed=args.seed,
    )
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return result
