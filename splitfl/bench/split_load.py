"""How many concurrent hospitals one split-he server holds: real processes, mutual TLS, server-side timings.

For each N in ``--hospitals`` this starts ONE ``splitfl serve`` process (split-he) and N ``splitfl join``
processes on 127.0.0.1 with mutual TLS, through the launcher (:mod:`splitfl.net.launch`: ``prepare``,
``server_command``, ``site_command``, ``start``). The configuration is tiny on the hospitals' side so that
the server's encrypted head dominates: synthetic X-rays at ``--size`` px, a frozen encoder whose features
are computed once per image, every hospital with exactly ``--rounds`` batches of ``--batch`` images per
epoch (the data are partitioned into N sites). Measured from the server's side:

* per-step latency: from the server granting a hospital its turn to the step closing (the hospital's
  encryption + the server's CKKS head forward + the hospital's update + the server applying it), read from
  ``<server out>/steps.csv`` (written by :func:`splitfl.net.split.server.run_split_server`);
* throughput: timed steps / the epochs' training time (validation between epochs excluded);
* rounds (every hospital takes one turn): time from the first grant to the last close, and its
  coefficient of variation (std / mean) over the run;
* the server's head compute per step (``server_s`` in ``steps.csv``);
* CPU (cores busy over the training span) of the server process, of the N hospitals and of everything else
  on the machine, the server's resident memory and the hospitals' memory (PSS) added up, sampled from /proc
  (psutil is not required);
* errors: turns that timed out (hospitals skipped, ``steps.csv`` and ``history.csv``), processes that
  exited non-zero, hospitals that reconnected, tracebacks in the logs.

The first round of the first epoch is a warm-up (context upload, feature caching) and is left out.

"Stable" at N means (:func:`judge`): no turn timeouts and no errors, p95 step latency <= ``--max-p95-ratio``
(2) x the p95 step latency at the smallest N measured (N=1 by default), and round-time CV <= ``--max-cv``
(0.5). The figure printed is the largest N for which N and every smaller N measured are stable.

    python bench/split_load.py [--hospitals 1 2 4 8 16] [--rounds 10] [--epochs 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from splitfl.artifacts import write_json
from splitfl.bench.procstat import Sampler, percentile, read_rows
from splitfl.config import (
    DataConfig,
    ModelConfig,
    PartitionConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
)
from splitfl.net.launch import free_port, prepare, server_command, site_command, start, write_config

__all__ = ["format_table", "judge", "load_config", "main", "run_benchmark", "summarise"]


def load_config(args: argparse.Namespace, n: int) -> RunConfig:
    """split-he, N IID sites of exactly ``rounds * batch`` synthetic images each, frozen encoder."""
    return RunConfig(
        regime="split-he",
        seed=args.seed,
        data=DataConfig(source="synthetic", modality="xray", n_train=n * args.rounds * args.batch, n_val=args.n_val,
                        n_test=args.n_val, size=args.size,
                        partition=PartitionConfig(scheme="iid", num_sites=n, min_site_size=1)),
        model=ModelConfig(name=args.model, freeze_encoder=True),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch, scheduler="none", progress=False, accelerator="cpu"),
        split=SplitConfig(he_preset=args.preset, cache_embeddings=True),
    )


# ----------------------------------------------------------------------------- one N


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _run_one(args: argparse.Namespace, n: int, root: Path, pki: Path, bar: Any) -> dict[str, Any]:
    """Server + n hospitals as processes until the run ends (or ``--timeout``); raw measurements."""

    cfg = load_config(args, n)
    out = root / f"n{n}"
    config = write_config(cfg, out / "run_config.yaml")
    address = f"127.0.0.1:{free_port()}"
    logs = out / "logs"
    load_before = os.getloadavg()
    t_launch = time.time()
    # the server runs from its own folder of the PKI (it refuses the whole PKI, which holds the CA key)
    procs = {"server": start(server_command(config, out / "server", pki / "server", address, False, args.turn_timeout),
                             logs / "server.log")}
    for i in range(n):
        procs[f"site-{i}"] = start(site_command(config, i, address, pki, out / "sites" / f"site-{i}", False,
                                                connect_timeout=args.timeout), logs / f"site-{i}.log")
    sampler = Sampler(procs["server"].pid, [p.pid for k, p in procs.items() if k != "server"], machine=True)
    deadline = time.monotonic() + args.timeout
    epochs_seen, timed_out, state = 0, False, ""
    try:
        while procs["server"].poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            sampler.sample()
            done = len(read_rows(out / "server" / "history.csv"))
            if done > epochs_seen:
                bar.update(done - epochs_seen)
                epochs_seen = done
            now = f"N={n}: " + ("starting / epoch 1" if not epochs_seen else
                                 f"epoch {epochs_seen + 1}" if epochs_seen < args.epochs else "test, finishing")
            if now != state:
                bar.set_postfix_str(now)
                state = now
            time.sleep(args.sample_s)
        for name, p in procs.items():  # the hospitals leave once told the run is over
            try:
                p.wait(timeout=30 if name != "server" else 1)
            except subprocess.TimeoutExpired:
                pass
    finally:
        _stop(procs)
    bar.update(max(0, args.epochs - epochs_seen))
    codes = {k: p.returncode for k, p in procs.items()}
    log_text = {f.name: f.read_text(errors="replace") for f in sorted(logs.glob("*.log"))}
    return {
        "n": n,
        "out": out,
        "launched": t_launch,
        "timed_out": timed_out,
        "exit_codes": codes,
        "steps": read_rows(out / "server" / "steps.csv"),
        "history": read_rows(out / "server" / "history.csv"),
        "sampler": sampler,
        "logs": log_text,
        "load": (load_before, os.getloadavg()),
    }


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """One N's row: step latency, throughput, rounds, CPU/RSS, errors (stability is judged by :func:`run_benchmark`)."""
    n, steps, sampler = raw["n"], raw["steps"], raw["sampler"]
    closed = [s for s in steps if s["outcome"] == "closed"]
    timeouts = sum(s["outcome"] == "timeout" for s in steps)
    skipped = sum(int(float(h.get("sites_skipped") or 0)) for h in raw["history"])
    by_epoch: dict[int, list[dict[str, str]]] = {}
    for s in closed:
        by_epoch.setdefault(int(s["epoch"]), []).append(s)
    first_epoch = min(by_epoch, default=0)
    timed: list[dict[str, str]] = []
    rounds, busy, warmup = [], 0.0, math.nan
    for epoch, rows in sorted(by_epoch.items()):
        rows.sort(key=lambda r: int(r["step"]))
        groups = [rows[i:i + n] for i in range(0, len(rows), n)]
        if epoch == first_epoch and groups:  # warm-up round: context upload, feature caching
            warmup = float(groups[0][-1]["closed"]) - float(groups[0][0]["granted"])
            groups = groups[1:]
        for g in groups:
            if len(g) == n and len({r["site"] for r in g}) == n:
                rounds.append(float(g[-1]["closed"]) - float(g[0]["granted"]))
            timed += g
        if groups:
            busy += float(groups[-1][-1]["closed"]) - float(groups[0][0]["granted"])
    lat = [float(s["closed"]) - float(s["granted"]) for s in timed]
    server_s = [float(s["server_s"]) for s in timed]
    t0 = min((float(s["granted"]) for s in timed), default=math.nan)
    t1 = max((float(s["closed"]) for s in timed), default=math.nan)
    cores = sampler.cores(t0, t1)
    logs = raw["logs"]
    site_logs = [v for k, v in logs.items() if k != "server.log"]
    failed = {k: c for k, c in raw["exit_codes"].items() if c not in (0,)}
    mean_round = statistics.mean(rounds) if rounds else math.nan
    first_grant = min((float(s["granted"]) for s in steps), default=math.nan)
    return {
        "hospitals": n,
        "steps_timed": len(lat),
        "rounds_timed": len(rounds),
        "step_s_median": statistics.median(lat) if lat else math.nan,
        "step_s_p95": percentile(lat, 0.95),
        "step_s_max": max(lat, default=math.nan),
        "server_s_median": statistics.median(server_s) if server_s else math.nan,  # the head's compute per step
        "steps_per_s": len(lat) / busy if busy > 0 else math.nan,
        "round_s_median": statistics.median(rounds) if rounds else math.nan,
        "round_s_mean": mean_round,
        "round_cv": statistics.pstdev(rounds) / mean_round if len(rounds) > 1 else math.nan,
        "warmup_round_s": warmup,
        "join_s": first_grant - raw["launched"],  # launch of all processes to the first granted step
        "server_cpu_cores": cores["proc"],
        "hospitals_cpu_cores": cores["others"],  # all N hospitals added up: about one active at a time
        "machine_cpu_cores": cores["machine"],  # everything on the machine, other users' jobs included
        "other_cpu_cores": cores["machine"] - cores["proc"] - cores["others"],
        "server_rss_mb_median": sampler.between(t0, t1)["rss_mb_median"],
        "server_rss_mb_peak": sampler.peak()["rss_mb_peak"] if sampler.samples else 0.0,  # 0: the server never ran
        "hospitals_pss_mb_peak_total": sampler.others_pss_peak_mb,
        "turn_timeouts": timeouts,
        "sites_skipped": skipped,
        "failed_processes": failed,
        "run_timed_out": raw["timed_out"],
        "reconnects": sum(t.count("reconnecting") for t in site_logs),
        "tracebacks": sum(t.count("Traceback") for t in logs.values()),
        "load_avg_1min": [raw["load"][0][0], raw["load"][1][0]],
        "step_latencies_s": lat,
        "round_times_s": rounds,
    }


def _errors(row: dict[str, Any]) -> int:
    return (row["turn_timeouts"] + row["sites_skipped"] + len(row["failed_processes"]) + int(row["run_timed_out"])
            + row["reconnects"] + row["tracebacks"])


def judge(rows: list[dict[str, Any]], max_p95_ratio: float, max_cv: float) -> dict[str, Any]:
    """Mark each row stable or not (in place) against the smallest N's row; the largest stable N and the rule.

    Stable: no errors; p95 step latency <= ``max_p95_ratio`` x the smallest N's p95 (the tail does not grow
    with N; on a shared machine the tail at N=1 is already other jobs' noise, 1.5-1.7x its median here, so
    the tail is compared with the tail); round-time CV <= ``max_cv``. ``round_to_linear`` (informational):
    the median round over N x the smallest N's median step, 1 when a round costs N single-hospital steps.
    """
    base = rows[0] if rows else {}
    base_p95, base_med = base.get("step_s_p95", math.nan), base.get("step_s_median", math.nan)
    stable_n = 0
    for row in rows:
        row["p95_to_base"] = row["step_s_p95"] / base_p95 if base_p95 > 0 else math.nan
        row["p95_to_base_median"] = row["step_s_p95"] / base_med if base_med > 0 else math.nan
        row["round_to_linear"] = row["round_s_median"] / (row["hospitals"] * base_med) if base_med > 0 else math.nan
        cv = row["round_cv"]
        row["stable"] = bool(row["errors"] == 0 and row["p95_to_base"] <= max_p95_ratio
                             and (cv is None or math.isnan(cv) or cv <= max_cv))
    for row in rows:
        if not row["stable"]:
            break
        stable_n = row["hospitals"]
    return {
        "largest_stable_hospitals": stable_n,
        "stability": {
            "base_hospitals": base.get("hospitals"),
            "base_step_s_median": base_med,
            "base_step_s_p95": base_p95,
            "max_p95_ratio": max_p95_ratio,
            "max_round_cv": max_cv,
            "rule": "no turn timeouts, skipped sites, failed processes, reconnects or tracebacks; "
                    "p95 step latency <= max_p95_ratio x the p95 step latency at the smallest N; "
                    "round-time CV <= max_round_cv; the figure is the largest N with every N' <= N stable",
        },
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    ns = sorted(set(args.hospitals))
    keep = args.keep
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="split_load_"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        # One PKI (certificates and tokens for the largest N) and one consortium key for every N.
        pki, _ = prepare(load_config(args, max(ns)), root, max(ns))
        bar = tqdm(total=len(ns) * args.epochs, desc="split-load", unit="epoch", disable=not args.progress)
        for n in ns:
            raw = _run_one(args, n, root, pki, bar)
            row = summarise(raw)
            row["errors"] = _errors(row)
            rows.append(row)
            if row["run_timed_out"] or "server" in row["failed_processes"] or not row["steps_timed"]:
                tail = raw["logs"].get("server.log", "").splitlines()[-8:]
                bar.write(f"N={n}: the run broke (see {raw['out']}/logs); larger N not tried\n  " + "\n  ".join(tail))
                break
        bar.close()
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

    return {
        **judge(rows, args.max_p95_ratio, args.max_cv),
        "rows": rows,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "progress", "keep")},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "transport": "gRPC, mutual TLS, 127.0.0.1, one process per party",
        },
    }


def format_table(r: dict[str, Any]) -> str:
    """Readable table of a :func:`run_benchmark` result."""
    c = r["config"]
    head = (f"{'N':>3s} {'steps':>5s} {'step med s':>10s} {'step p95 s':>10s} {'p95/base':>8s} {'srv s/step':>10s} "
            f"{'steps/s':>7s} {'round med s':>11s} {'/linear':>7s} {'round CV':>8s} {'CPU srv':>7s} {'hosp':>5s} {'other':>5s} "
            f"{'srv RSS MB':>10s} {'hosp PSS MB':>11s} {'join s':>6s} {'timeouts':>8s} {'errors':>6s} {'stable':>6s}")
    lines = [
        (f"split-he load: one server, N hospital processes, mutual TLS on 127.0.0.1; {c['model']} (frozen) at "
         f"{c['size']} px, batch {c['batch']}, {c['rounds']} rounds x {c['epochs']} epochs, CKKS {c['preset']!r}"),
        head,
        "-" * len(head),
    ]
    for row in r["rows"]:
        lines.append(
            f"{row['hospitals']:3d} {row['steps_timed']:5d} {row['step_s_median']:10.3f} {row['step_s_p95']:10.3f} "
            f"{row['p95_to_base']:7.2f}x {row['server_s_median']:10.3f} {row['steps_per_s']:7.2f} "
            f"{row['round_s_median']:11.2f} {row['round_to_linear']:6.2f}x {row['round_cv']:8.3f} {row['server_cpu_cores']:7.2f} "
            f"{row['hospitals_cpu_cores']:5.2f} {row['other_cpu_cores']:5.2f} {row['server_rss_mb_peak']:10.0f} "
            f"{row['hospitals_pss_mb_peak_total']:11.0f} {row['join_s']:6.1f} "
            f"{row['turn_timeouts'] + row['sites_skipped']:8d} {row['errors']:6d} {'yes' if row['stable'] else 'NO':>6s}"
        )
    s = r["stability"]
    lines += [
        "",
        "step: the server granting a turn to the step closing (hospital encrypts, server's CKKS head forward,",
        "hospital's head update, server applies it); srv s/step: the server's head compute in a step (median);",
        "round: every hospital takes one turn (first grant to last close); the first round is a warm-up, left out;",
        "/linear: round median / (N x the smallest N's median step), 1 when a round costs N single-hospital steps;",
        "steps/s: timed steps / training time (validation between epochs excluded).",
        "CPU: cores busy over the training span: the server process, the N hospitals added up, and everything else",
        "on the machine (other users' jobs); srv RSS: the server's peak resident memory; hosp PSS: the hospitals'",
        "memory added up (proportional set size, peak); join s: launch to the first step; errors: timeouts + skipped",
        "sites + failed processes + reconnects + tracebacks.",
        (f"stable: no errors, p95 step <= {s['max_p95_ratio']:g} x the N={s['base_hospitals']} p95 step "
         f"({s['base_step_s_p95']:.3f} s), round CV <= {s['max_round_cv']:g}."),
        f"largest stable N: {r['largest_stable_hospitals']}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="numbers of hospitals N")
    parser.add_argument("--rounds", type=int, default=10, help="batches per hospital per epoch (rounds per epoch)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28, help="image size (pixels)")
    parser.add_argument("--n-val", type=int, default=64, help="validation and test images (evaluated through the HE head)")
    parser.add_argument("--model", default="resnet18", help="timm encoder, frozen (features cached)")
    parser.add_argument("--preset", default="default", help="CKKS preset (splitfl.he.params.PRESETS)")
    parser.add_argument("--turn-timeout", type=float, default=60.0, help="seconds a hospital may hold a turn before it is skipped")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for one N, start to finish")
    parser.add_argument("--max-p95-ratio", type=float, default=2.0, help="stable: p95 step <= this x the smallest N's p95 step")
    parser.add_argument("--max-cv", type=float, default=0.5, help="stable: round-time coefficient of variation <= this")
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between /proc samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="keep the runs' folders (logs, steps.csv) here instead of a temporary folder")
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
