"""Process entry points: ``splitfl serve``, ``splitfl join``, ``splitfl simulate`` (and the consortium keys).

* :func:`serve` runs the coordinating server: the gRPC FederationService plus
  the shared epoch loop (:func:`splitfl.train.fit` with a
  :class:`~splitfl.net.federation.RemoteFedRunner`), so ``--out`` gets the
  same ``checkpoint.pt``, ``best_model.pt``, ``history.csv``, ``metrics.json``
  and ``config.yaml`` as ``splitfl train``, and a restarted server resumes
  from its checkpoint.
* :func:`join` runs one hospital (:class:`~splitfl.net.federation.FedSiteClient`).
* :func:`simulate` makes a development PKI (and, under ``fed.secure: he``, the
  consortium keys) under ``DIR/pki`` if absent, starts the server and one
  process per hospital on 127.0.0.1 with ``sys.executable -m splitfl ...``,
  writes their logs to ``DIR/logs/`` and returns the server's metrics.

Regimes other than fedavg/fedprox are handed to
``splitfl.net.split_remote.run_split_server`` / ``run_split_site``.

Keys under ``fed.secure: he``: the hospitals share the consortium's secret
context ``<pki>/consortium.secret`` (in a deployment each hospital keeps its
copy; it never goes to the server); the server reads only the public context
``<pki>/server/consortium.public`` (or ``--public-context``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from splitfl.config import RunConfig

FED_REGIMES = ("fedavg", "fedprox")
SECRET_KEY_FILE = "consortium.secret"
PUBLIC_CONTEXT_FILE = "server/consortium.public"
SERVER_INFO = "server.json"


def _run_error(msg: str) -> Exception:
    from splitfl.train import RunError

    return RunError(msg)


def _split_remote(name: str) -> Callable[..., Any]:
    """The split-learning entry point of that name (split-plain / split-he / split-he-full over gRPC)."""
    import importlib

    return getattr(importlib.import_module("splitfl.net.split_remote"), name)


def make_consortium_keys(pki_dir: str | Path, preset: str) -> tuple[Path, Path]:
    """The hospitals' shared secret context and the server's public copy (made once; reused after)."""
    from splitfl.artifacts import write_bytes
    from splitfl.he.keys import consortium_secret_context, public_context_bytes

    pki = Path(pki_dir)
    secret = pki / SECRET_KEY_FILE
    public = pki / PUBLIC_CONTEXT_FILE
    ctx = consortium_secret_context(secret, preset, "fed.he_preset")
    if not public.is_file():
        public.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(public, public_context_bytes(ctx), 0o644)
    return secret, public


# ----------------------------------------------------------------------------- server


def serve(
    cfg: RunConfig,
    out: str | Path,
    pki_dir: Optional[str | Path],
    address: str = "127.0.0.1:50051",
    insecure: bool = False,
    *,
    round_timeout: float = 600.0,
    join_timeout: float = 600.0,
    run_id: Optional[str] = None,
    public_context: Optional[str | Path] = None,
    finish_grace: float = 15.0,
    phase_timeout: Optional[float] = None,
) -> dict[str, Any]:
    """Run the coordinating server until the last round; returns what metrics.json holds.

    ``phase_timeout`` (fed.secure masks): how long each secure-aggregation step after the key advertisement
    waits for the sites (default ``round_timeout``, which also covers the local training before it).
    """
    if cfg.regime not in FED_REGIMES:
        kw: dict[str, Any] = {"round_timeout": round_timeout, "join_timeout_s": join_timeout}
        if run_id:
            kw["run_id"] = run_id
        return _split_remote("run_split_server")(cfg, out, address, pki_dir, insecure, **kw)

    from splitfl.artifacts import write_json
    from splitfl.data import load_splits
    from splitfl.fed.flat import FlatSpec
    from splitfl.fed.runner import FedRunner
    from splitfl.fed.server import FedServerCore, build_fed_model
    from splitfl.net.federation import FederationServer, RemoteFedRunner, make_server
    from splitfl.plots import plot_learning_curves
    from splitfl.train import RunError, fit, make_fabric, write_run_metrics

    class _Cfg:  # FedRunner's config checks, without building a runner
        pass

    probe = _Cfg()
    probe.cfg = cfg  # type: ignore[attr-defined]
    FedRunner._check_config(probe)  # type: ignore[arg-type]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fabric = make_fabric(cfg.train)
    t0 = time.perf_counter()
    splits = load_splits(cfg.data)
    fabric.seed_everything(cfg.seed, verbose=False)  # the same initial model as the in-process run
    model = build_fed_model(cfg, splits.task.num_outputs, splits.task.n_channels, fabric.print).to(fabric.device)
    spec = FlatSpec(model)
    he_mask = public_ctx = ctx_bytes = None
    if cfg.fed.secure == "he":
        from splitfl.he.keys import load_public_context

        try:
            he_mask = spec.select(cfg.fed.he_layers)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        path = Path(public_context) if public_context else Path(pki_dir or ".") / PUBLIC_CONTEXT_FILE
        if not path.is_file():
            raise RunError(f"fed.secure: he: the consortium's public context {path} is missing (make it with `splitfl simulate` or make_consortium_keys)")
        ctx_bytes = path.read_bytes()
        public_ctx = load_public_context(ctx_bytes)  # refuses a context that holds a secret key
    core = FedServerCore(cfg, spec.size, spec.flatten(model), None, he_mask=he_mask, public_ctx=public_ctx, log=fabric.print)
    servicer = FederationServer(cfg, core, run_id=run_id, round_timeout=round_timeout, phase_timeout=phase_timeout,
                                public_context=ctx_bytes, log=fabric.print)
    server, port = make_server(servicer, address, pki_dir, insecure)
    host = address.rsplit(":", 1)[0]
    write_json(out_dir / SERVER_INFO, {"address": f"{host}:{port}", "pid": os.getpid(), "run_id": servicer.run_id})
    fabric.print(f"[server] {cfg.regime} ({cfg.fed.secure}) serving run {servicer.run_id} on {host}:{port} "
                 f"({'INSECURE plaintext' if insecure else 'mutual TLS'}); waiting for {servicer.num_sites} sites")
    try:
        runner = RemoteFedRunner(fabric, cfg, splits, servicer, model, join_timeout)
        result = fit(fabric, runner, cfg, splits, out_dir, cfg.regime)
    finally:
        servicer.finish()
        _linger(servicer, finish_grace)
        server.stop(grace=2).wait()
    plot_learning_curves({cfg.regime: result["history"]}, out_dir / "learning_curves.png", f"{cfg.regime}: {splits.task.name}")
    metrics = write_run_metrics(cfg, splits, result, t0, out_dir, print)
    return metrics


def _linger(servicer: Any, grace: float) -> None:
    """Keep answering for a moment so that connected sites learn the run is over."""
    deadline = time.monotonic() + grace
    with servicer.cond:
        told = set()
        while time.monotonic() < deadline:
            told |= getattr(servicer, "finished_told", set())
            if set(servicer.sessions) <= told:
                break
            servicer.cond.wait(0.2)


# ----------------------------------------------------------------------------- site


def join(
    cfg: RunConfig,
    site: int,
    server: str,
    pki_dir: str | Path,
    out: str | Path,
    insecure: bool = False,
    *,
    run_id: Optional[str] = None,
    keys: Optional[str | Path] = None,
    connect_timeout: float = 120.0,
) -> list[int]:
    """Run hospital ``site`` until the server says the run is over; the rounds it trained."""
    if cfg.regime not in FED_REGIMES:
        kw = {"connect_timeout": connect_timeout}
        if run_id:
            kw["run_id"] = run_id
        if keys:
            kw["keys"] = keys
        _split_remote("run_split_site")(cfg, site, server, pki_dir, insecure, out, **kw)
        return []
    from splitfl.net.certs import read_token
    from splitfl.net.federation import FedSiteClient, RemoteError, site_name
    from splitfl.net.tls import channel_credentials, make_channel, site_paths

    sp = site_paths(Path(pki_dir), site_name(site)) if (Path(pki_dir) / "manifest.json").is_file() else site_paths(Path(pki_dir))
    creds = None if insecure else channel_credentials(sp.ca_cert, sp.cert, sp.key)
    channel = make_channel(server, creds, insecure=insecure, site=sp.site, token=read_token(sp.token))
    key_file = Path(keys) if keys else Path(pki_dir) / SECRET_KEY_FILE
    try:
        client = FedSiteClient(cfg, site, channel, out, run_id=run_id, secret_key_file=key_file, connect_timeout=connect_timeout)
        return client.run()
    except RemoteError as exc:
        raise _run_error(f"site {site}: the server refused or went away: {exc}") from None
    finally:
        channel.close()


# ----------------------------------------------------------------------------- simulation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(cfg: RunConfig, path: Path) -> Path:
    import yaml

    from splitfl.train import config_dict

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    return path


def server_command(config: Path, out: Path, pki: Path, address: str, insecure: bool, round_timeout: float,
                   phase_timeout: Optional[float] = None) -> list[str]:
    cmd = [sys.executable, "-m", "splitfl", "serve", "--config", str(config), "--out", str(out), "--pki", str(pki),
           "--address", address, "--round-timeout", str(round_timeout)]
    if phase_timeout is not None:
        cmd += ["--phase-timeout", str(phase_timeout)]
    return cmd + (["--insecure"] if insecure else [])


def site_command(config: Path, site: int, address: str, pki: Path, out: Path, insecure: bool, connect_timeout: float = 120.0) -> list[str]:
    cmd = [sys.executable, "-m", "splitfl", "join", "--config", str(config), "--site", str(site), "--server", address,
           "--pki", str(pki), "--out", str(out), "--connect-timeout", str(connect_timeout)]
    return cmd + (["--insecure"] if insecure else [])


def start(cmd: list[str], log_path: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def prepare(cfg: RunConfig, out: Path, sites: int) -> tuple[Path, Path]:
    """DIR/pki (development PKI, consortium keys under HE) and DIR/config.yaml for the processes."""
    from splitfl.net.certs import make_dev_pki

    pki = out / "pki"
    if not (pki / "manifest.json").is_file():
        make_dev_pki(pki, sites)
    if cfg.regime in FED_REGIMES and cfg.fed.secure == "he":
        make_consortium_keys(pki, cfg.fed.he_preset)
    elif cfg.regime not in FED_REGIMES:  # split-*: the hospitals' shared key file, made once before they start
        _split_remote("ensure_consortium_keys")(cfg, pki)
    return pki, write_config(cfg, out / "run_config.yaml")


def simulate(
    cfg: RunConfig,
    out: str | Path,
    sites: Optional[int] = None,
    insecure: bool = False,
    *,
    round_timeout: float = 120.0,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """The server and every hospital as separate local processes over gRPC; the server's metrics."""
    out_dir = Path(out).absolute()
    if insecure:
        from splitfl.net.tls import insecure_allowed

        insecure_allowed(True, "gRPC federation on 127.0.0.1 (server and every hospital)")
    if sites is not None:
        cfg.data.partition.num_sites = sites
    n = cfg.data.partition.num_sites
    pki, config = prepare(cfg, out_dir, n)
    address = f"127.0.0.1:{free_port()}"
    logs = out_dir / "logs"
    procs = {"server": start(server_command(config, out_dir / "server", pki, address, insecure, round_timeout), logs / "server.log")}
    for i in range(n):
        procs[f"site-{i}"] = start(site_command(config, i, address, pki, out_dir / "sites" / f"site-{i}", insecure), logs / f"site-{i}.log")
    print(f"simulate: server on {address} and {n} sites; logs in {logs}/")
    deadline = time.monotonic() + timeout
    try:
        while procs["server"].poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if procs["server"].poll() is None:
            raise _run_error(f"the server did not finish within {timeout:.0f} s; see {logs}/server.log")
        for name, p in procs.items():
            try:
                p.wait(timeout=max(5.0, deadline - time.monotonic()) if name != "server" else 1)
            except subprocess.TimeoutExpired:
                pass
        if procs["server"].returncode != 0:
            tail = (logs / "server.log").read_text(errors="replace").splitlines()[-15:]
            raise _run_error(f"the server exited with {procs['server'].returncode}; last lines of {logs}/server.log:\n" + "\n".join(tail))
        bad = {k: p.returncode for k, p in procs.items() if k != "server" and p.returncode not in (0, None)}
        if bad:
            print(f"simulate: warning: sites exited with errors {bad}; see {logs}/", file=sys.stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    return json.loads((out_dir / "server" / "metrics.json").read_text())
