"""Process entry points: ``splitfl serve``, ``splitfl join``, ``splitfl simulate`` (and the consortium keys).

* :func:`serve` runs the coordinating server: the gRPC FederationService plus
  the shared epoch loop (:func:`splitfl.engine.fit` with a
  :class:`~splitfl.net.fed.server.RemoteFedRunner`), so ``--out`` gets the
  same ``checkpoint.pt``, ``best_model.pt``, ``history.csv``, ``metrics.json``
  and ``config.yaml`` as ``splitfl train``, and a restarted server resumes
  from its checkpoint.
* :func:`join` runs one hospital (:class:`~splitfl.net.fed.hospital.FedSiteClient`).
* :func:`simulate` makes a development PKI (and, under ``fed.secure: he``, the
  consortium keys) under ``DIR/pki`` if absent, starts the server and one
  process per hospital on 127.0.0.1 with ``sys.executable -m splitfl ...``,
  writes their logs to ``DIR/logs/`` and returns the server's metrics.

Regimes other than fedavg/fedprox are handed to
``splitfl.net.split.server.run_split_server`` / ``splitfl.net.split.hospital.run_split_site``.

Folders: every party runs from its own folder of the ``splitfl certs`` PKI, the
server from ``<pki>/server`` (refused if it holds any secret: the CA key, a
consortium secret, a site's key or token) and hospital N from
``<pki>/sites/site-N``. ``splitfl keys`` (:func:`make_consortium_keys`) makes
the configured regime's keys: the hospitals' shared secret
``<pki>/consortium.secret`` (``relay.secret`` in split-plain) with a copy in
every ``sites/<site>/`` folder (it never goes to the server) and, under
``fed.secure: he``, the server's public context ``<pki>/server/consortium.public``
(or ``--public-context``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from splitfl.artifacts import write_bytes, write_json
from splitfl.config import RunConfig
from splitfl.data import load_splits
from splitfl.engine import RunError, config_dict, fit, make_fabric, write_run_metrics
from splitfl.fed.flat import FlatSpec
from splitfl.fed.runner import FedRunner
from splitfl.fed.server import FedServerCore, build_fed_model
from splitfl.he.keys import (
    consortium_secret_context,
    context_fingerprint,
    load_public_context,
    load_secret_context,
    params_of,
    public_context_bytes,
)
from splitfl.he.mlp import MLP_DEPTH
from splitfl.he.params import HEError, check_depth, get_preset
from splitfl.net.certs import PkiError, load_pki, load_server_folder, make_dev_pki, read_token
from splitfl.net.fed.common import RemoteError, site_name
from splitfl.net.fed.hospital import FedSiteClient
from splitfl.net.fed.server import RemoteFedRunner
from splitfl.net.fed.servicer import FederationServer, make_server
from splitfl.net.split.common import RELAY_KEY_FILE, relay_key_material, relay_needed
from splitfl.net.split.hospital import run_split_site
from splitfl.net.split.server import run_split_server
from splitfl.net.tls import channel_credentials, insecure_allowed, make_channel, site_paths
from splitfl.plots import plot_learning_curves
from splitfl.split.runner import full_preset

FED_REGIMES = ("fedavg", "fedprox")
SECRET_KEY_FILE = "consortium.secret"
PUBLIC_CONTEXT_NAME = "consortium.public"  # in the server's own folder
PUBLIC_CONTEXT_FILE = "server/" + PUBLIC_CONTEXT_NAME  # the same, relative to a `splitfl certs` folder
SERVER_INFO = "server.json"


def _run_error(msg: str) -> Exception:
    return RunError(msg)


@dataclasses.dataclass(frozen=True)
class ConsortiumKeys:
    """What :func:`make_consortium_keys` made (or found and checked), for ``splitfl keys`` to report."""

    key_file: Path  # the hospitals' shared key at the PKI root: the administrator's copy, never the server's
    site_copies: tuple[Path, ...]  # the same file in each sites/<site>/ folder, so a hospital needs only its own
    public: Optional[Path]  # server/consortium.public: fedavg / fedprox with fed.secure he only
    preset: Optional[str]  # the CKKS preset of the key (None: split-plain's relay sealing key, no HE)
    what: str  # the config key that chose it


def consortium_key_spec(cfg: RunConfig) -> Optional[tuple[str, Optional[str], str]]:
    """(key file name, CKKS preset or None, config key that sets it) of the configured regime; None if it needs none.

    Each regime's key is the one its runner builds: fedavg/fedprox + fed.secure he aggregate under
    ``fed.he_preset``; split-he encrypts under ``split.he_preset``; split-he-full under
    :func:`splitfl.split.runner.full_preset` (one rescale); split-plain with a trainable encoder shares only
    the relay sealing key (no HE). Galois / relinearisation keys are not in the file: the hospitals derive the
    exact ones the head needs from it at run time.
    """
    if cfg.regime in FED_REGIMES:
        return (SECRET_KEY_FILE, cfg.fed.he_preset, "fed.he_preset") if cfg.fed.secure == "he" else None
    if cfg.regime == "split-he":
        return SECRET_KEY_FILE, cfg.split.he_preset, "split.he_preset"
    if cfg.regime == "split-he-full":
        return SECRET_KEY_FILE, full_preset(cfg), "split.he_preset"
    if cfg.regime == "split-plain" and relay_needed(cfg):
        return RELAY_KEY_FILE, None, "model.freeze_encoder"
    return None


def _check_preset(cfg: RunConfig, preset: str, what: str) -> Any:
    """The CKKS parameters of ``preset``, refused (RunError) if the regime cannot compute with them."""

    try:
        params = get_preset(preset)
        if cfg.regime == "split-he-full" and params.levels < 1:
            raise HEError(f"{params.describe()} has no rescaling level; split-he-full rescales each product once "
                          "(use split.he_preset: full)")
        if cfg.regime == "split-he" and cfg.model.cut == "mlp" and cfg.split.mlp_inference == "noninteractive":
            check_depth(params, MLP_DEPTH)  # the whole MLP head on ciphertexts
    except HEError as exc:
        raise _run_error(f"{what}={preset!r} for {cfg.regime}: {exc}") from None
    return params


def make_consortium_keys(pki_dir: str | Path, cfg: RunConfig) -> ConsortiumKeys:
    """The keys the configured regime needs, made once per consortium (reused and checked after) in each party's folder.

    ``<pki>/consortium.secret`` (``relay.secret`` in split-plain) and a copy in every ``sites/<site>/`` folder
    of a ``splitfl certs`` PKI, so each hospital runs from its own folder; under fedavg/fedprox with
    ``fed.secure: he`` also the server's PUBLIC context, ``<pki>/server/consortium.public``, so the server
    runs from its own folder too (a split server gets the public context from a hospital at run time). The
    CKKS preset is the regime's (:func:`consortium_key_spec`). Raises RunError for a regime that needs no key
    or a key file made for other parameters, PkiError when the parties' copies disagree.
    """

    spec = consortium_key_spec(cfg)
    if spec is None:
        secure = f" with fed.secure: {cfg.fed.secure}" if cfg.regime in FED_REGIMES else ""
        raise _run_error(f"regime {cfg.regime}{secure} uses no consortium key: nothing to make. Keys are for fedavg / "
                         "fedprox with fed.secure: he, split-he, split-he-full, and split-plain with a trainable "
                         "encoder (model.freeze_encoder: false, its relay key); check --config / --regime")
    name, preset, what = spec
    pki = Path(pki_dir)
    if not pki.is_dir():
        raise PkiError(f"{pki} is not a folder: make the PKI first with `splitfl certs --out {pki} --sites N`")
    key_file = pki / name
    ctx = None
    if preset is not None:
        want = _check_preset(cfg, preset, what)
        if key_file.exists():
            got = params_of(load_secret_context(key_file))
            if (got.poly_modulus_degree, tuple(got.coeff_mod_bit_sizes)) != (want.poly_modulus_degree,
                                                                              tuple(want.coeff_mod_bit_sizes)):
                raise _run_error(
                    f"{key_file} already holds a consortium key for other CKKS parameters ({got.describe()}), but "
                    f"{cfg.regime} with {what}={preset} needs {want.describe()}. A key is made once per consortium "
                    f"and reused: move the old key (and every hospital's copy) away and run `splitfl keys` again, "
                    f"or set {what} to the key's preset")
        ctx = consortium_secret_context(key_file, preset, what)
    else:
        relay_key_material(pki, False)  # 32 random bytes, made once
    data = key_file.read_bytes()
    copies: list[Path] = []
    if (pki / "manifest.json").is_file():
        for site in load_pki(pki).sites.values():
            target = site.key.parent / name
            if target.exists() and target.read_bytes() != data:
                raise PkiError(f"{target} holds another key than {key_file}: the hospitals must share one. Remove "
                               f"{target} (no run may still need it) and run `splitfl keys` again to copy {key_file}")
            if not target.exists():
                write_bytes(target, data, 0o600)
            copies.append(target)
    public = None
    if cfg.regime in FED_REGIMES:
        public = pki / PUBLIC_CONTEXT_FILE
        if public.is_file():
            if context_fingerprint(load_public_context(public.read_bytes())) != context_fingerprint(ctx):
                raise PkiError(f"{public} is the public part of another key than {key_file}: remove it and run "
                               "`splitfl keys` again to write the matching one")
        else:
            public.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(public, public_context_bytes(ctx), 0o644)
    return ConsortiumKeys(key_file, tuple(copies), public, preset, what)


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

    ``pki_dir`` is the server's own folder (``DIR/server`` of ``splitfl certs``), refused if it holds a secret
    (:func:`splitfl.net.certs.load_server_folder`); under ``fed.secure: he`` the public context is read from
    its ``consortium.public`` (put there by ``splitfl keys``) unless ``public_context`` names another file.
    ``join_timeout``: how long the first round waits for every site to join (RunError naming the missing ones
    after it). ``phase_timeout`` (fed.secure masks): how long each secure-aggregation step after the key
    advertisement waits for the sites (default ``round_timeout``, which also covers the local training before it).
    """
    if cfg.regime not in FED_REGIMES:
        kw: dict[str, Any] = {"round_timeout": round_timeout, "join_timeout_s": join_timeout}
        if run_id:
            kw["run_id"] = run_id
        return run_split_server(cfg, out, address, pki_dir, insecure, **kw)

    if pki_dir is None:
        raise PkiError("the server needs --pki: its own folder from `splitfl certs --out DIR` (DIR/server)")
    own = load_server_folder(pki_dir, require_tls=not insecure)  # at once, before loading anything

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
        try:
            he_mask = spec.select(cfg.fed.he_layers)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        path = Path(public_context) if public_context else own.root / PUBLIC_CONTEXT_NAME
        if not path.is_file():
            raise RunError(f"fed.secure: he: the consortium's public context {path} is missing: make it with "
                           "`splitfl keys --config <this config> --pki <PKI folder>` (it writes "
                           f"<PKI folder>/{PUBLIC_CONTEXT_FILE}, inside the server's folder) or pass --public-context")
        ctx_bytes = path.read_bytes()
        public_ctx = load_public_context(ctx_bytes)  # refuses a context that holds a secret key
    core = FedServerCore(cfg, spec.size, spec.flatten(model), None, he_mask=he_mask, public_ctx=public_ctx, log=fabric.print)
    servicer = FederationServer(cfg, core, run_id=run_id, round_timeout=round_timeout, phase_timeout=phase_timeout,
                                public_context=ctx_bytes, log=fabric.print)
    server, port = make_server(servicer, address, own.root, insecure)
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
    """Run hospital ``site`` until the server says the run is over; the rounds it trained.

    ``pki_dir`` is the hospital's own folder (``DIR/sites/site-N``: certificate, key, token and, from
    ``splitfl keys``, the consortium's key) or, in development, the whole PKI folder. ``keys`` overrides the
    key file (default ``<pki_dir>/consortium.secret``).
    """
    if cfg.regime not in FED_REGIMES:
        kw = {"connect_timeout": connect_timeout}
        if run_id:
            kw["run_id"] = run_id
        if keys:
            kw["keys"] = keys
        run_split_site(cfg, site, server, pki_dir, insecure, out, **kw)
        return []

    sp = site_paths(Path(pki_dir), site_name(site)) if (Path(pki_dir) / "manifest.json").is_file() else site_paths(Path(pki_dir))
    creds = None if insecure else channel_credentials(sp.ca_cert, sp.cert, sp.key)
    channel = make_channel(server, creds, insecure=insecure, site=sp.site, token=read_token(sp.token))
    key_file = Path(keys) if keys else Path(pki_dir) / SECRET_KEY_FILE
    if cfg.fed.secure == "he" and not key_file.is_file():
        channel.close()
        raise _run_error(f"site {site}: fed.secure: he needs the consortium's secret key, {key_file}, which is missing: "
                         "run `splitfl keys --config <this config> --pki <PKI folder>` (it puts a copy in every "
                         "sites/<site>/ folder) and give this hospital its folder, or pass --keys FILE")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    return path


def server_command(config: Path, out: Path, pki: Path, address: str, insecure: bool, round_timeout: float,
                   phase_timeout: Optional[float] = None) -> list[str]:
    """``splitfl serve`` as a process; ``pki`` is the server's own folder (``DIR/server``), not the whole PKI."""
    cmd = [sys.executable, "-m", "splitfl", "serve", "--config", str(config), "--out", str(out), "--pki", str(pki),
           "--address", address, "--round-timeout", str(round_timeout)]
    if phase_timeout is not None:
        cmd += ["--phase-timeout", str(phase_timeout)]
    return cmd + (["--insecure"] if insecure else [])


def site_command(config: Path, site: int, address: str, pki: Path, out: Path, insecure: bool, connect_timeout: float = 120.0) -> list[str]:
    """``splitfl join`` as a process; ``pki`` is the hospital's own folder (``DIR/sites/site-N``) or the whole PKI."""
    cmd = [sys.executable, "-m", "splitfl", "join", "--config", str(config), "--site", str(site), "--server", address,
           "--pki", str(pki), "--out", str(out), "--connect-timeout", str(connect_timeout)]
    return cmd + (["--insecure"] if insecure else [])


def start(cmd: list[str], log_path: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def prepare(cfg: RunConfig, out: Path, sites: int) -> tuple[Path, Path]:
    """DIR/pki (development PKI and the regime's consortium keys, in each party's folder) and DIR/config.yaml.

    The keys are made once, before the hospitals start (two hospitals making them at once would make two).
    The server then runs from ``DIR/pki/server`` and hospital N from ``DIR/pki/sites/site-N`` alone.
    """

    pki = out / "pki"
    if not (pki / "manifest.json").is_file():
        make_dev_pki(pki, sites)
    if consortium_key_spec(cfg) is not None:
        make_consortium_keys(pki, cfg)
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
        insecure_allowed(True, "gRPC federation on 127.0.0.1 (server and every hospital)")
    if sites is not None:
        cfg.data.partition.num_sites = sites
    n = cfg.data.partition.num_sites
    pki, config = prepare(cfg, out_dir, n)
    address = f"127.0.0.1:{free_port()}"
    logs = out_dir / "logs"
    # each party from its own folder, as in a deployment: the server never sees the CA key or the consortium secret
    procs = {"server": start(server_command(config, out_dir / "server", pki / "server", address, insecure, round_timeout),
                             logs / "server.log")}
    for i in range(n):
        procs[f"site-{i}"] = start(site_command(config, i, address, pki / "sites" / f"site-{i}", out_dir / "sites" / f"site-{i}",
                                                insecure), logs / f"site-{i}.log")
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
