"""Hundreds of clinics: one real split-he server under 8 to 256 lightweight hospitals, and a FedAvg+HE round of 128.

The server is the real one, in its own process (``splitfl serve``: :mod:`splitfl.net.split.servicer`,
:mod:`~splitfl.net.split.coordinator`, or :mod:`splitfl.net.fed.servicer`), with mutual TLS and a certificate
and token per site from the development PKI (:mod:`splitfl.net.certs`). The hospitals are light: a few
processes of :mod:`splitfl.bench.clinic_clients`, each running many hospitals as threads with one channel
(one TLS connection) each, through the same wire client as real hospitals
(:class:`~splitfl.net.split.client.SplitClient`, :class:`~splitfl.net.fed.client.FedClient`), without torch.
They replay real messages made once before the run by the real encryption code under the real consortium
key: enc(activations) of a batch (:meth:`splitfl.he.linear.PackedLinearHE.encrypt_activations`), the head's
update, and for FedAvg an update packaged by :func:`splitfl.fed.site.package_update` (CKKS,
:func:`splitfl.he.aggregation.encrypt_update`). So the hospitals' CKKS work is not in the numbers: what is
measured is the server.

split-he, per N (frozen encoder, every hospital with ``--rounds`` batches, one epoch, then the validation
and test evaluations through the head):

* step latency: the server granting a turn to the step closing (``steps.csv``): the hospital hearing of its
  turn (GetTurn), Forward (the server's CKKS head on enc(activations)), ApplyUpdate; p50 / p95, and the
  hospital's own view of the step (its turn's reply to ApplyUpdate's) beside it;
* steps/s over the epoch's training span; the server's head compute per step (``server_s``);
* the server process from /proc: RSS (median over the training span and peak), threads, open connections
  (ESTABLISHED TCP sockets it holds), CPU cores; RSS growth per hospital by a least-squares line over N;
* errors: any failed call or hospital (with its traceback), a hospital skipped or a turn timed out, a
  non-zero exit, a traceback in the server's log.

FedAvg+HE (``--fed-sites``): one round with every site sampled; the round's time (first site told of the round
to the decrypted mean accepted), the server's RSS, errors, bytes up and down.

    splitfl bench clinic-load [--hospitals 8 32 128 256] [--rounds 3] [--fed-sites 128] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from splitfl.artifacts import to_jsonable, write_json
from splitfl.bench.procstat import Sampler, percentile, read_rows
from splitfl.config import (
    DataConfig,
    FedConfig,
    ModelConfig,
    PartitionConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
    run_config_from_dict,
)
from splitfl.data import load_splits
from splitfl.engine import config_dict
from splitfl.fed.flat import FlatSpec
from splitfl.fed.server import build_fed_model, vector_bytes
from splitfl.fed.site import package_update
from splitfl.he.aggregation import capacity
from splitfl.he.keys import context_fingerprint, load_secret_context, params_of, public_context_bytes
from splitfl.he.linear import PackedLinearHE
from splitfl.metrics import TaskMetrics
from splitfl.models import build_split_model
from splitfl.net.fed.common import _context_fp, default_run_id, run_fingerprint
from splitfl.net.launch import free_port, prepare, server_command, start, write_config
from splitfl.net.split.common import _fp_bytes, config_fingerprint
from splitfl.tensors import tensor_to_bytes

__all__ = ["fit_line", "format_table", "main", "run_benchmark"]


# ----------------------------------------------------------------------------- configurations


def rounds_for(args: argparse.Namespace, n: int) -> int:
    """Steps per hospital at N: ``--rounds``, or more so that every N times at least ``--min-steps`` steps
    (a p95 over 24 steps is the second-slowest step, too noisy to compare N against)."""
    return max(args.rounds, math.ceil(args.min_steps / n))


def split_config(args: argparse.Namespace, n: int) -> RunConfig:
    """split-he, N IID sites of exactly ``rounds * batch`` synthetic images, frozen encoder (a linear probe)."""
    return RunConfig(
        regime="split-he", seed=args.seed,
        data=DataConfig(source="synthetic", modality="xray", n_train=n * rounds_for(args, n) * args.batch,
                        n_val=args.n_val,
                        n_test=args.n_val, size=args.size, partition=PartitionConfig(scheme="iid", num_sites=n, min_site_size=1)),
        model=ModelConfig(name=args.model, freeze_encoder=True),
        train=TrainConfig(epochs=1, batch_size=args.batch, scheduler="none", progress=False, accelerator="cpu"),
        split=SplitConfig(he_preset=args.preset, cache_embeddings=True),
    )


def fed_config(args: argparse.Namespace, n: int) -> RunConfig:
    """fedavg with fed.secure he, N IID sites of ``fed_samples`` images, every site sampled, one round."""
    return RunConfig(
        regime="fedavg", seed=args.seed,
        data=DataConfig(source="synthetic", modality="xray", n_train=n * args.fed_samples, n_val=args.n_val,
                        n_test=args.n_val, size=args.size, partition=PartitionConfig(scheme="iid", num_sites=n, min_site_size=1)),
        model=ModelConfig(name=args.fed_model),
        train=TrainConfig(epochs=1, batch_size=args.batch, scheduler="none", progress=False, accelerator="cpu"),
        fed=FedConfig(secure="he", client_fraction=1.0),
    )


def _as_served(cfg: RunConfig) -> RunConfig:
    """The configuration as the server reads it back from its YAML file (the fingerprints are of this one)."""
    return run_config_from_dict(config_dict(cfg))


# ----------------------------------------------------------------------------- running one load


def _drive(args: argparse.Namespace, out: Path, config: Path, server_pki: Path, spec: dict[str, Any],
           sites: int, bar: Any, label: str) -> dict[str, Any]:
    """The server process and the client processes until the run ends (or ``--timeout``); raw measurements."""
    address = f"127.0.0.1:{free_port()}"
    logs = out / "logs"
    server = start(server_command(config, out / "server", server_pki, address, False, args.turn_timeout), logs / "server.log",
                   env={"OMP_NUM_THREADS": "1"})
    sampler = Sampler(server.pid, connections=True)
    spec = {**spec, "address": address}
    nproc = max(1, min(args.client_procs, sites))
    clients = []
    for k in range(nproc):
        part = {**spec, "sites": list(range(k, sites, nproc))}
        spec_file = out / f"clients-{k}.json"
        spec_file.write_text(json.dumps(part))
        clients.append(start([sys.executable, "-m", "splitfl.bench.clinic_clients", str(spec_file), str(out / f"result-{k}.json")],
                             logs / f"clients-{k}.log"))
    t_launch = time.time()
    deadline = time.monotonic() + args.timeout
    timed_out = False
    bar.set_postfix_str(label)
    try:
        while server.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            sampler.sample()
            time.sleep(args.sample_s)
        for p in clients:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    bar.update(1)
    hospitals: list[dict[str, Any]] = []
    torch_loaded = False
    for k in range(nproc):
        path = out / f"result-{k}.json"
        if path.is_file():
            res = json.loads(path.read_text())
            hospitals += res["hospitals"]
            torch_loaded |= bool(res["torch_loaded"])
    return {
        "launched": t_launch, "timed_out": timed_out, "sampler": sampler,
        "exit_codes": {"server": server.returncode, **{f"clients-{k}": p.returncode for k, p in enumerate(clients)}},
        "hospitals": hospitals, "clients_loaded_torch": torch_loaded,
        "server_log": (logs / "server.log").read_text(errors="replace") if (logs / "server.log").is_file() else "",
        "client_logs": "".join(f.read_text(errors="replace") for f in sorted(logs.glob("clients-*.log"))),
        "steps": read_rows(out / "server" / "steps.csv"), "history": read_rows(out / "server" / "history.csv"),
    }


def _errors(raw: dict[str, Any], expected_hospitals: int) -> dict[str, Any]:
    hosp_errors = [e for h in raw["hospitals"] for e in h["errors"]]
    failed = {k: c for k, c in raw["exit_codes"].items() if c != 0}
    missing = expected_hospitals - len(raw["hospitals"])
    tracebacks = raw["server_log"].count("Traceback") + raw["client_logs"].count("Traceback")
    timeouts = sum(s.get("outcome") == "timeout" for s in raw["steps"])
    skipped = sum(int(float(h.get("sites_skipped") or 0)) for h in raw["history"])
    total = len(hosp_errors) + len(failed) + max(0, missing) + tracebacks + timeouts + skipped + int(raw["timed_out"])
    return {"errors": total, "hospital_errors": len(hosp_errors), "error_samples": [e[:2000] for e in hosp_errors[:3]],
            "failed_processes": failed, "missing_hospitals": max(0, missing), "tracebacks": tracebacks,
            "turn_timeouts": timeouts, "sites_skipped": skipped, "run_timed_out": raw["timed_out"],
            "clients_loaded_torch": raw["clients_loaded_torch"]}


def _calls(hospitals: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    kinds: dict[str, list[float]] = {}
    for h in hospitals:
        for k, v in h["calls"].items():
            kinds.setdefault(k, []).extend(v)
    return {k: {"n": len(v), "p50_ms": percentile(v, 0.5), "p95_ms": percentile(v, 0.95)}
            for k, v in sorted(kinds.items())}


# ----------------------------------------------------------------------------- split-he


def _split_messages(args: argparse.Namespace, cfg: RunConfig, pki: Path, folder: Path) -> dict[str, Any]:
    """The replayed messages, made once by the real code under the consortium key: files and the spec's facts."""
    splits = load_splits(cfg.data)
    torch.manual_seed(args.seed)
    model, _ = build_split_model(cfg.model, splits.task.num_outputs, splits.task.n_channels, cfg.data.size)
    lin = model.head.linear_layers()[0]
    secret = load_secret_context(pki / "consortium.secret")
    he = PackedLinearHE(lin.in_features, lin.out_features, args.batch, params_of(secret).slots)
    feats = torch.rand(args.batch, lin.in_features)  # post-ReLU pooled features are >= 0 and O(1)
    forward = he.encrypt_activations(secret, feats).to_bytes()
    update = tensor_to_bytes(1e-4 * torch.randn(lin.out_features * (lin.in_features + 1)))
    metrics = TaskMetrics(splits.task, device="cpu")  # what a hospital reports, computed by the real metrics code
    logits = torch.randn(args.n_val, splits.task.num_outputs)
    labels = splits.val[torch.arange(args.n_val)][1]
    metrics.update(logits, labels, loss=0.69)
    files = {"context": public_context_bytes(secret), "forward": forward, "update": update}
    folder.mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        (folder / f"{k}.bin").write_bytes(v)
    served = _as_served(cfg)
    return {
        "messages": {k: str(folder / f"{k}.bin") for k in files},
        "bytes": {k: len(v) for k, v in files.items()},
        "feature_dim": lin.in_features, "num_classes": lin.out_features,
        "context_fingerprint": _fp_bytes(context_fingerprint(secret)).hex(),
        "fingerprint": config_fingerprint(served).hex(), "run_id": f"split-{config_fingerprint(served).hex()[:16]}",
        "eval_metrics": to_jsonable(metrics.compute()),
    }


def _split_row(args: argparse.Namespace, n: int, raw: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    steps = [s for s in raw["steps"] if s.get("outcome") == "closed"]
    lat = [float(s["closed"]) - float(s["granted"]) for s in steps]
    server_s = [float(s["server_s"]) for s in steps]
    client = [st["client_step_ms"] / 1000 for h in raw["hospitals"] for st in h["steps"]]
    t0 = min((float(s["granted"]) for s in steps), default=math.nan)
    t1 = max((float(s["closed"]) for s in steps), default=math.nan)
    span = t1 - t0 if steps else math.nan
    srv = raw["sampler"]
    row: dict[str, Any] = {
        "hospitals": n, "steps": len(lat),
        "step_s_p50": percentile(lat, 0.5), "step_s_p95": percentile(lat, 0.95),
        "step_s_max": max(lat, default=math.nan),
        "client_step_s_p50": percentile(client, 0.5), "client_step_s_p95": percentile(client, 0.95),
        "server_s_p50": percentile(server_s, 0.5),
        "steps_per_s": (len(lat) - 1) / span if len(lat) > 1 and span > 0 else math.nan,
        "join_s": t0 - raw["launched"] if steps else math.nan,
        **{f"server_{k}": v for k, v in srv.between(t0, t1, or_last=True).items()},
        **{f"server_{k}": v for k, v in srv.peak().items()},
        "calls": _calls(raw["hospitals"]),
        "bytes_up": sum(h["bytes_up"] for h in raw["hospitals"]),
        "bytes_down": sum(h["bytes_down"] for h in raw["hospitals"]),
        **_errors(raw, n),
    }
    row["expected_steps"] = n * rounds_for(args, n)
    if row["steps"] != row["expected_steps"]:
        row["errors"] += 1
    return row


def run_split(args: argparse.Namespace, root: Path, bar: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ns = sorted(set(args.hospitals))
    pki, _ = prepare(split_config(args, max(ns)), root / "split", max(ns))
    facts: dict[str, Any] = {}
    rows = []
    for n in ns:
        cfg = split_config(args, n)
        out = root / "split" / f"n{n}"
        if not facts:
            facts = _split_messages(args, cfg, pki, root / "split" / "messages")
        served = _as_served(cfg)
        fp = config_fingerprint(served)
        spec = {**facts, "fingerprint": fp.hex(), "run_id": f"split-{fp.hex()[:16]}", "mode": "split", "pki": str(pki),
                "rounds": rounds_for(args, n), "batch": args.batch, "poll_ms": args.poll_ms, "context_uploader": 0,
                "eval_batches": math.ceil(args.n_val / args.batch), "connect_timeout_s": 120.0,
                "stagger_s": args.stagger_s, "timeout_s": args.timeout}
        spec.pop("bytes")
        raw = _drive(args, out, write_config(cfg, out / "run_config.yaml"), pki / "server", spec, n, bar, f"split-he N={n}")
        row = _split_row(args, n, raw, facts)
        rows.append(row)
        if row["errors"] and not args.keep_going:
            bar.write(f"N={n}: {row['errors']} error(s) (see {out}/logs); larger N not tried: "
                      + "; ".join(row["error_samples"])[:1500])
            break
    return rows, {"bytes": facts.get("bytes", {}), "feature_dim": facts.get("feature_dim"),
                  "num_classes": facts.get("num_classes")}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys on xs; nan with fewer than two points."""
    pts = [(x, y) for x, y in zip(xs, ys) if not (math.isnan(x) or math.isnan(y))]
    if len(pts) < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
    return float(slope), float(intercept)


# ----------------------------------------------------------------------------- FedAvg + HE


def run_fed(args: argparse.Namespace, root: Path, bar: Any) -> dict[str, Any]:
    n = args.fed_sites
    cfg = fed_config(args, n)
    out = root / "fed"
    pki, config = prepare(cfg, out, n)
    served = _as_served(cfg)
    splits = load_splits(cfg.data)
    torch.manual_seed(args.seed)
    spec_model = FlatSpec(build_fed_model(served, splits.task.num_outputs, splits.task.n_channels))
    mask = spec_model.select(served.fed.he_layers)
    secret = load_secret_context(pki / "consortium.secret")
    samples = args.fed_samples
    bound = capacity(params_of(secret)) / (samples * n)  # what the server announces (FedServerCore.he_value_bound)
    update = (1e-3 * np.random.default_rng(args.seed).standard_normal(spec_model.size)).astype(np.float32)
    folder = out / "messages"
    folder.mkdir(parents=True, exist_ok=True)
    for site in range(n):  # each its own encryption: the server refuses the same ciphertext twice (a replay)
        plain, enc = package_update(served, update, samples, size=spec_model.size, he_mask=mask, secret_ctx=secret,
                                    value_bound=bound)
        (folder / f"enc-{site}.bin").write_bytes(enc)
    files = {"plain": plain, "mean": vector_bytes(update[mask])}  # every site sends this update: the mean is it
    for k, v in files.items():
        (folder / f"{k}.bin").write_bytes(v)
    spec = {"mode": "fed", "pki": str(pki), "messages": {k: str(folder / f"{k}.bin") for k in files},
            "site_messages": {"enc": str(folder / "enc-{site}.bin")},
            "run_id": default_run_id(served), "fingerprint": run_fingerprint(served).hex(),
            "context_fingerprint": _context_fp(secret).hex(), "sample_count": samples, "num_sites": n,
            "poll_ms": 5000, "connect_timeout_s": 120.0, "stagger_s": args.stagger_s, "timeout_s": args.timeout}
    raw = _drive(args, out, config, pki / "server", spec, n, bar, f"FedAvg+HE {n} sites")
    sampled = [st["sampled_unix"] for h in raw["hospitals"] for st in h["steps"] if "sampled_unix" in st]
    submitted = [st["submitted_unix"] for h in raw["hospitals"] for st in h["steps"] if "submitted_unix" in st]
    decrypted = [st["decrypted_unix"] for h in raw["hospitals"] for st in h["steps"] if "decrypted_unix" in st]
    t0, t1 = min(sampled, default=math.nan), max(decrypted, default=math.nan)
    hist = raw["history"][0] if raw["history"] else {}
    errs = _errors(raw, n)
    if len(submitted) != n or not decrypted:
        errs["errors"] += 1
    return {
        "sites": n, "model": args.fed_model, "update_params": spec_model.size, "encrypted_params": int(mask.sum()),
        "round_s": t1 - t0, "submit_s_max": max(submitted, default=math.nan) - t0,
        "decrypt_s": t1 - max(submitted, default=math.nan), "updates_submitted": len(submitted),
        "server_epoch_s": float(hist.get("seconds") or math.nan),
        **{f"server_{k}": v for k, v in raw["sampler"].between(t0, t1, or_last=True).items()},
        **{f"server_{k}": v for k, v in raw["sampler"].peak().items()},
        "bytes_up_per_site": len(plain) + len(enc), "bytes_down_per_site": sum(h["bytes_down"] for h in raw["hospitals"]) // max(n, 1),
        "bytes_up_total": sum(h["bytes_up"] for h in raw["hospitals"]),
        "bytes_down_total": sum(h["bytes_down"] for h in raw["hospitals"]),
        "server_bytes_up": float(hist.get("bytes_up") or math.nan), "server_bytes_down": float(hist.get("bytes_down") or math.nan),
        "calls": _calls(raw["hospitals"]), **errs,
    }


# ----------------------------------------------------------------------------- the whole benchmark


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clinic_load_"))
    root.mkdir(parents=True, exist_ok=True)
    total = len(set(args.hospitals)) + (1 if args.fed_sites else 0)
    try:
        bar = tqdm(total=total, desc="clinic-load", unit="run", disable=not args.progress)
        rows, facts = run_split(args, root, bar) if args.hospitals else ([], {})
        fed = run_fed(args, root, bar) if args.fed_sites else None
        bar.close()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    slope, intercept = fit_line([r["hospitals"] for r in rows], [r["server_rss_mb_median"] for r in rows])
    base = rows[0] if rows else {}
    for r in rows:
        r["p95_to_base"] = r["step_s_p95"] / base["step_s_p95"] if base.get("step_s_p95") else math.nan
    largest = rows[-1] if rows else {}
    return {
        "split": {"rows": rows, "rss_mb_per_hospital": slope, "rss_mb_intercept": intercept,
                  "p95_ratio_largest_to_smallest": largest.get("p95_to_base", math.nan),
                  "base_hospitals": base.get("hospitals"), "largest_hospitals": largest.get("hospitals"),
                  "holds": bool(rows) and all(r["errors"] == 0 for r in rows) and largest.get("p95_to_base", math.inf) <= 2.0,
                  **facts},
        "fed": fed,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "progress", "keep")},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                        "cpu": platform.processor() or platform.machine(),
                        "transport": "gRPC, mutual TLS, 127.0.0.1; server one process, hospitals as threads in "
                                     f"{args.client_procs} client processes, one connection each"},
    }


def _f(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else "-"


def format_table(r: dict[str, Any]) -> str:
    """Readable tables of a :func:`run_benchmark` result."""
    c, s = r["config"], r["split"]
    head = (f"{'N':>4s} {'steps':>5s} {'p50 s':>7s} {'p95 s':>7s} {'p95/base':>8s} {'client p95':>10s} {'srv s':>6s} "
            f"{'steps/s':>7s} {'RSS MB':>7s} {'peak MB':>7s} {'threads':>7s} {'conns':>5s} {'CPU':>5s} {'join s':>6s} {'errors':>6s}")
    lines = [f"split-he, one server process, N lightweight hospitals (mutual TLS, one connection each); {c['model']} "
             f"(frozen) head {s.get('feature_dim')}->{s.get('num_classes')}, batch {c['batch']}, {c['rounds']} steps per "
             f"hospital (at least {c['min_steps']} steps per N), CKKS {c['preset']!r}; enc(activations) {s.get('bytes', {}).get('forward', 0) / 1e6:.2f} MB a step",
             head, "-" * len(head)]
    for row in s["rows"]:
        lines.append(
            f"{row['hospitals']:4d} {row['steps']:5d} {_f(row['step_s_p50'], '7.3f')} {_f(row['step_s_p95'], '7.3f')} "
            f"{_f(row['p95_to_base'], '7.2f')}x {_f(row['client_step_s_p95'], '10.3f')} {_f(row['server_s_p50'], '6.3f')} "
            f"{_f(row['steps_per_s'], '7.2f')} {_f(row['server_rss_mb_median'], '7.0f')} {_f(row['server_rss_mb_peak'], '7.0f')} "
            f"{row['server_threads_peak']:7d} {row['server_connections_peak']:5d} {_f(row['server_cpu_cores'], '5.2f')} "
            f"{_f(row['join_s'], '6.1f')} {row['errors']:6d}")
    lines += [
        "",
        "step: the server granting a turn to the step closing (steps.csv: GetTurn wake-up, Forward on enc(activations),",
        "ApplyUpdate); client p95: the hospital's own view (its turn's reply to ApplyUpdate's reply); srv s: the",
        "server's head compute in a step (p50); RSS: the server's resident memory over the training span (median),",
        "peak: its high-water mark; threads / conns: the server process's threads and ESTABLISHED TCP connections (peak);",
        "CPU: cores the server used over the training span; join s: launch to the first granted step; errors: failed",
        "calls or hospitals, missing steps, skipped hospitals, turn timeouts, non-zero exits, tracebacks.",
        f"server RSS growth: {_f(s['rss_mb_per_hospital'], '.3f')} MB per hospital (least squares over N; intercept "
        f"{_f(s['rss_mb_intercept'], '.0f')} MB); p95({s.get('largest_hospitals')})/p95({s.get('base_hospitals')}) = "
        f"{_f(s['p95_ratio_largest_to_smallest'], '.2f')}; holds (no errors, ratio <= 2): {'yes' if s['holds'] else 'NO'}",
    ]
    f = r.get("fed")
    if f:
        lines += [
            "",
            f"FedAvg+HE round, {f['sites']} lightweight sites, {f['model']} ({f['update_params']} parameters, "
            f"{f['encrypted_params']} encrypted): round {_f(f['round_s'], '.2f')} s (all updates in "
            f"{_f(f['submit_s_max'], '.2f')} s, then sum + remote decryption {_f(f['decrypt_s'], '.2f')} s); server RSS "
            f"{_f(f['server_rss_mb_median'], '.0f')} MB (peak {_f(f['server_rss_mb_peak'], '.0f')}), threads "
            f"{f['server_threads_peak']}, connections {f['server_connections_peak']}; up {f['bytes_up_per_site'] / 1e6:.2f} "
            f"MB/site ({f['bytes_up_total'] / 1e6:.0f} MB), down {f['bytes_down_total'] / 1e6:.0f} MB in all; "
            f"errors {f['errors']}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=int, nargs="*", default=[8, 32, 128, 256], help="numbers of hospitals N (none: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="steps per hospital (batches in its epoch)")
    parser.add_argument("--min-steps", type=int, default=256,
                        help="at least this many steps per N (smaller N: more steps per hospital)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28, help="image size (pixels; the server's data only)")
    parser.add_argument("--n-val", type=int, default=64, help="validation and test images (evaluated through the HE head)")
    parser.add_argument("--model", default="resnet18", help="split-he encoder (frozen; fixes the head's width)")
    parser.add_argument("--preset", default="default", help="split-he CKKS preset (splitfl.he.params.PRESETS)")
    parser.add_argument("--fed-sites", type=int, default=128, help="sites of the FedAvg+HE round (0: skip)")
    parser.add_argument("--fed-model", default="test_resnet", help="FedAvg model (fixes the update's size)")
    parser.add_argument("--fed-samples", type=int, default=16, help="images per FedAvg site")
    parser.add_argument("--client-procs", type=int, default=4, help="client processes the hospitals are spread over")
    parser.add_argument("--poll-ms", type=int, default=10_000, help="GetTurn long-poll (as run_split_site's default)")
    parser.add_argument("--stagger-s", type=float, default=0.01, help="seconds between hospital starts in a process")
    parser.add_argument("--turn-timeout", type=float, default=120.0, help="seconds a silent hospital holds its turn")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one run")
    parser.add_argument("--sample-s", type=float, default=0.25, help="seconds between /proc samples of the server")
    parser.add_argument("--keep-going", action="store_true", help="try larger N after one with errors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="keep the runs' folders (logs, steps.csv, messages) here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    result = run_benchmark(args)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
