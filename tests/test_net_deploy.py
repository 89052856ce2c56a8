"""Deployment defects found by probing the servers as an attacker or a newcomer would.

* Each server runs from its own PKI folder (``pki/server``) alone and refuses a folder holding a secret it
  must not have (the CA key, a consortium secret, a site's key or token); each hospital from its own.
* ``splitfl keys`` makes the keys of the configured regime (split-he, split-he-full, fedavg + fed.secure he).
* The join timeout: a site that never joins stops the server with a clear error and nothing recorded; a site
  that joins a few seconds late, within the timeout, is served.
* A request whose sequence number jumps far ahead of its session's is refused like a replay.

Real servers throughout: gRPC with mutual TLS on 127.0.0.1, as processes (started with splitfl.net.launch's
commands, as `splitfl simulate` does) where the behaviour is the command line's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from net_harness import Federation, wait_for
from test_net_federation import _channel, _refused, live_server  # noqa: F401  (live_server is a fixture)
from test_net_federation import net_config as fed_config
from test_net_split import net_config as split_config

from splitfl.net import max_sequence_jump
from splitfl.net.certs import PkiError, load_server_folder, make_dev_pki
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pb_grpc


def _params(ctx) -> tuple[int, tuple[int, ...]]:
    from splitfl.he.keys import params_of

    p = params_of(ctx)
    return p.poly_modulus_degree, tuple(p.coeff_mod_bit_sizes)


def _preset(name: str) -> tuple[int, tuple[int, ...]]:
    from splitfl.he.params import PRESETS

    return PRESETS[name].poly_modulus_degree, tuple(PRESETS[name].coeff_mod_bit_sizes)


# ----------------------------------------------------------------------------- 1. each server from its own folder


def _fed_servicer(cfg):
    from splitfl.fed.server import FedServerCore
    from splitfl.net.fed.servicer import FederationServer

    return FederationServer(cfg, FedServerCore(cfg, 4, np.zeros(4, np.float32), None), log=lambda m: None)


def test_servers_run_from_their_own_folder_and_refuse_one_holding_a_secret(tmp_path):
    """The fedavg and split servers accept a copy of pki/server alone; the whole PKI and server folders with a
    planted secret (named as such or not) are refused, naming the file, before anything is served or loaded."""
    from splitfl.he.keys import create_secret_context, save_secret_context
    from splitfl.he.params import PRESETS
    from splitfl.net.fed.servicer import make_server
    from splitfl.net.split.server import run_split_server

    pki = make_dev_pki(tmp_path / "pki", 2)
    fed_cfg = fed_config()
    fed_cfg.data.partition.num_sites = 2
    split_cfg = split_config("split-plain")

    alone = shutil.copytree(pki.root / "server", tmp_path / "server-machine")  # what gets copied to the server
    server, port = make_server(_fed_servicer(fed_cfg), "127.0.0.1:0", alone, insecure=False)
    server.stop(grace=0)
    assert port > 0

    secret_ctx = tmp_path / "ctx.bin"
    save_secret_context(create_secret_context(PRESETS["small"]), secret_ctx)
    plants = {  # file in the server's folder -> where its content comes from, and what the error must name
        "ca.key": (pki.ca_key, "CA private key"),
        "consortium.secret": (secret_ctx, "consortium secret"),
        "keys-backup.bin": (secret_ctx, "consortium secret context"),  # content sniffed: any name
        "client.key": (pki.site("site-0").key, "private key other than"),
        "hospital.pem": (pki.site("site-1").key, "private key other than"),  # content sniffed: any name
        "token": (pki.site("site-0").token, "site's token"),
    }
    # what -> (folder, the file the error must name, why, what to do)
    folders = {"the whole PKI": (pki.root, "ca/ca.key", "CA private key", f"--pki {pki.root / 'server'}")}
    for name, (src, why) in plants.items():
        folder = shutil.copytree(pki.root / "server", tmp_path / f"with-{name}")
        shutil.copy(src, folder / name)
        folders[name] = (folder, name, why, "remove those files")
    swapped = shutil.copytree(pki.root / "server", tmp_path / "ca-as-server-key")
    shutil.copy(pki.ca_key, swapped / "server.key")
    folders["the CA key as server.key"] = (swapped, "server.key", "it is the CA private key", "remove those files")

    for what, (folder, file, why, todo) in folders.items():
        with pytest.raises(PkiError, match="secrets a server must never have") as info:
            load_server_folder(folder)
        message = str(info.value)
        assert f"{file}: " in message and why in message and todo in message, (what, message)
        with pytest.raises(PkiError, match="secrets a server must never have"):  # the fedavg server
            make_server(_fed_servicer(fed_cfg), "127.0.0.1:0", folder, insecure=False)
        with pytest.raises(PkiError, match="secrets a server must never have"):  # the split server, at once
            run_split_server(split_cfg, tmp_path / "out" / what, "127.0.0.1:0", folder, False,
                             join_timeout_s=1, eval_timeout_s=1, turn_timeout_s=1, finish_grace_s=0)
        assert not (tmp_path / "out" / what / "history.csv").exists()


@pytest.mark.slow
def test_serve_command_refuses_the_whole_pki_and_says_which_folder_to_pass(tmp_path):
    """`splitfl serve --pki pki` (the CA key, the consortium secret and every site's key inside) exits 2 at once."""
    from splitfl.net.launch import prepare

    cfg = fed_config("he", epochs=1)
    pki, config = prepare(cfg, tmp_path, cfg.data.partition.num_sites)
    assert (pki / "consortium.secret").is_file()
    cmd = [sys.executable, "-m", "splitfl", "serve", "--config", str(config), "--out", str(tmp_path / "server"),
           "--pki", str(pki), "--address", "127.0.0.1:0", "--join-timeout", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "secrets a server must never have" in done.stderr and "ca/ca.key" in done.stderr
    assert f"--pki {pki / 'server'}" in done.stderr
    assert not (tmp_path / "server" / "history.csv").exists()


# ----------------------------------------------------------------------------- 2. `splitfl keys` follows the regime


def test_keys_are_made_for_the_configured_regime_and_land_in_each_partys_folder(tmp_path, capsys):
    from splitfl.cli import main
    from splitfl.he.keys import context_fingerprint, load_public_context, load_secret_context
    from splitfl.split.runner import full_preset

    def keys(pki, *args):
        main(["keys", "--pki", str(pki), *args])

    # split-he: split.he_preset (here 'small'), never fed.he_preset ('aggregation')
    pki = make_dev_pki(tmp_path / "split-he", 2).root
    keys(pki, "--regime", "split-he", "--split.he_preset", "small")
    secret = pki / "consortium.secret"
    assert _params(load_secret_context(secret)) == _preset("small") != _preset("aggregation")
    for site in ("site-0", "site-1"):  # each hospital needs only its own folder
        copy = pki / "sites" / site / "consortium.secret"
        assert copy.read_bytes() == secret.read_bytes() and (copy.stat().st_mode & 0o777) == 0o600
    assert not (pki / "server" / "consortium.public").exists()  # the split server gets it from a hospital
    load_server_folder(pki / "server")  # still servable
    assert "preset small (split.he_preset)" in capsys.readouterr().out
    # a key made for other parameters is refused, not silently reused
    with pytest.raises(SystemExit) as info:
        keys(pki, "--regime", "split-he", "--split.he_preset", "default")
    assert info.value.code == 2 and "other CKKS parameters" in capsys.readouterr().err

    # split-he-full: full_preset (one rescale of a ciphertext x ciphertext product), or any preset with a rescale
    pki = make_dev_pki(tmp_path / "split-he-full", 1).root
    keys(pki, "--regime", "split-he-full")
    assert _params(load_secret_context(pki / "consortium.secret")) == _preset(full_preset(split_config("split-he-full")))
    assert _preset(full_preset(split_config("split-he-full"))) == _preset("full")
    small = make_dev_pki(tmp_path / "small-full", 1).root
    keys(small, "--regime", "split-he-full", "--split.he_preset", "small")
    assert _params(load_secret_context(small / "consortium.secret")) == _preset("small")

    # fedavg + fed.secure he: fed.he_preset, and the public context in the server's folder
    pki = make_dev_pki(tmp_path / "fed-he", 2).root
    keys(pki, "--regime", "fedavg", "--fed.secure", "he")
    ctx = load_secret_context(pki / "consortium.secret")
    assert _params(ctx) == _preset("aggregation")
    public = load_public_context((pki / "server" / "consortium.public").read_bytes())  # refuses a secret key
    assert context_fingerprint(public) == context_fingerprint(ctx)
    assert (pki / "sites" / "site-1" / "consortium.secret").read_bytes() == (pki / "consortium.secret").read_bytes()
    load_server_folder(pki / "server")

    # a regime without any consortium key: a clear error, nothing written
    pki = make_dev_pki(tmp_path / "plain", 1).root
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        keys(pki, "--regime", "fedavg")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "uses no consortium key" in err and "fed.secure: he" in err
    assert not (pki / "consortium.secret").exists() and not (pki / "server" / "consortium.public").exists()


# ----------------------------------------------------------------------------- 3. join timeout


@pytest.mark.slow
def test_fedavg_server_stops_clearly_when_a_site_never_joins(tmp_path):
    """--join-timeout 8 and site-1 never comes: exit 2 naming it, the wait and the option; nothing recorded."""
    cfg = fed_config(epochs=1)
    cfg.data.partition.num_sites = 2
    fed = Federation(cfg, tmp_path, round_timeout=30)
    try:
        fed.start_server(join_timeout=8)
        fed.start_site(0)
        try:
            fed.procs["server"].wait(timeout=240)
        except subprocess.TimeoutExpired:
            raise AssertionError("the server did not stop:\n" + fed.log("server")[-3000:]) from None
        log = fed.log("server")
        assert fed.procs["server"].returncode == 2, log[-3000:]
        assert "site(s) site-1 never joined: waited" in log and "join timeout 8 s" in log, log[-3000:]
        assert "--join-timeout" in log
        assert not (tmp_path / "server" / "history.csv").exists()
        assert not (tmp_path / "server" / "checkpoint.pt").exists()
    finally:
        fed.close()


def test_split_coordinator_never_hands_an_empty_epoch_to_the_checkpoint():
    """What the report showed with a short --join-timeout: no hospital in time, and the epoch was recorded with
    train_loss 0 (and the head's scheduler stepped without its optimizer). Now: a RunError naming them; and an
    epoch whose hospitals came but finished no step is refused too, instead of being returned as trained."""
    import threading

    from splitfl.engine import RunError
    from splitfl.net.split.coordinator import Coordinator

    coord = Coordinator(2, False, "backward", turn_timeout_s=0.5, join_timeout_s=0.5)
    with pytest.raises(RunError, match=r"site-0, site-1 never joined: waited \d+ s \(join timeout 0.5 s\).*--join-timeout"):
        coord.run_epoch(0)
    assert coord.phase == "between" and coord.open_step is None

    def come_and_fall_silent() -> None:  # both hospitals ask for a turn (one batch each), then never act
        wait_for(lambda: coord.phase == "train", 10, "the epoch")
        with coord.cond:
            for site in (0, 1):
                coord._turn_once(site, 0, 1)
            coord.cond.notify_all()

    helper = threading.Thread(target=come_and_fall_silent, daemon=True)
    helper.start()
    with pytest.raises(RunError, match="epoch 1 trained no sample.*refusing to record an empty epoch"):
        coord.run_epoch(0)
    helper.join(10)


def _late_second_site(start_site, log, delay: float = 3.0) -> None:
    """Start site 0; once it has joined, wait ``delay`` seconds more and start site 1 (late, within the timeout)."""
    start_site(0)
    wait_for(lambda: "joined run" in log("site-0"), 180, "site 0 to join")
    time.sleep(delay)
    start_site(1)


@pytest.mark.slow
def test_split_site_joining_late_within_the_join_timeout_is_served(tmp_path):
    """split-plain from each party's own folder: the server waits for the late hospital and the run completes."""
    cfg = split_config("split-plain", freeze=True, epochs=2)
    fed = Federation(cfg, tmp_path, round_timeout=60)
    try:
        fed.start_server(join_timeout=90)
        _late_second_site(fed.start_site, fed.log)
        metrics = fed.wait_server(timeout=300)
        rows = fed.history()
        assert [int(r["sites_skipped"]) for r in rows] == [0, 0], rows
        assert all(float(r["train_loss"]) > 0 for r in rows), rows  # no empty epoch
        assert metrics["test"]["n"] == 64
        assert "lr_scheduler.step()" not in fed.log("server")  # no scheduler stepped without its optimizer
    finally:
        fed.close()


@pytest.mark.slow
def test_fedavg_he_site_joining_late_is_served_with_each_party_holding_only_its_folder(tmp_path):
    """fedavg + fed.secure he: `splitfl keys` (via prepare) put the public context in pki/server and the secret in each
    pki/sites/site-N; each folder is copied alone to its own "machine" and the late site is served."""
    from splitfl.net.launch import server_command, site_command, start

    cfg = fed_config("he", epochs=1)
    cfg.data.partition.num_sites = 2
    fed = Federation(cfg, tmp_path / "run", round_timeout=120)
    server_pki = shutil.copytree(fed.pki / "server", tmp_path / "server-machine" / "pki")
    site_pki = [shutil.copytree(fed.pki / "sites" / f"site-{i}", tmp_path / f"hospital-{i}" / "pki") for i in range(2)]
    assert (server_pki / "consortium.public").is_file() and not list(server_pki.rglob("*.secret"))
    assert all((p / "consortium.secret").is_file() for p in site_pki)
    out = tmp_path / "run" / "server"
    logs = tmp_path / "run" / "logs"

    def start_site(i: int) -> None:
        cmd = site_command(fed.config, i, fed.address, site_pki[i], tmp_path / f"hospital-{i}" / "out", False)
        fed.procs[f"site-{i}"] = start(cmd, logs / f"site-{i}.log")

    try:
        cmd = server_command(fed.config, out, server_pki, fed.address, False, 120) + ["--join-timeout", "90"]
        fed.procs["server"] = start(cmd, logs / "server.log")
        _late_second_site(start_site, fed.log)
        metrics = fed.wait_server(timeout=300)
        assert [int(r["accepted"]) for r in fed.history()] == [2]
        assert metrics["protocol"]["secure"] == "he" and metrics["protocol"]["server_has_secret_key"] is False
        for i in range(2):
            assert fed.procs[f"site-{i}"].wait(timeout=60) == 0, fed.log(f"site-{i}")[-2000:]
    finally:
        fed.close()


# ----------------------------------------------------------------------------- 4. sequence-number jumps


def test_fed_sequence_number_jumping_far_ahead_is_refused_and_moves_nothing(live_server):  # noqa: F811
    from splitfl.net.fed.common import run_fingerprint

    cfg, pki, servicer, address, _ = live_server
    channel = _channel(pki, "site-1", address)
    stub = pb_grpc.FederationServiceStub(channel)

    def hdr(seq, session=b""):
        return pb.RequestHeader(protocol_version=1, run_id=servicer.run_id, config_fingerprint=run_fingerprint(cfg),
                                site_id=1, session_id=session, sequence=seq)

    joined = list(stub.Join(pb.JoinRequest(header=hdr(0), client_nonce=os.urandom(16), sample_count=48), timeout=10))
    session = joined[0].run.session.session_id

    def get_round(seq):
        return stub.GetRound(pb.GetRoundRequest(header=hdr(seq, session), min_round=0, max_wait_ms=0), timeout=10)

    detail = _refused(lambda: get_round(1_000_000), grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED)
    assert detail.highest_sequence == 0 and "jumps more than" in detail.message
    get_round(1)  # the refused jump moved nothing: the session goes on at 1
    jump = max_sequence_jump(servicer.replay_window)
    assert jump == 16 * 64
    _refused(lambda: get_round(2 + jump), grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED)
    get_round(1 + jump)  # the largest jump allowed
    assert servicer.sessions[1].highest == 1 + jump
    channel.close()


def test_split_sequence_number_jumping_far_ahead_is_refused_and_moves_nothing(tmp_path):
    from splitfl.engine import make_optimizer
    from splitfl.models import build_split_model
    from splitfl.net.certs import read_token
    from splitfl.net.split.common import RemoteError, config_fingerprint
    from splitfl.net.split.coordinator import Coordinator
    from splitfl.net.split.hospital import RemoteSplitServer
    from splitfl.net.split.servicer import SplitServicer, serve
    from splitfl.net.tls import channel_credentials, make_channel

    cfg = split_config("split-plain")
    pki = make_dev_pki(tmp_path / "pki", 2)
    head = build_split_model(cfg.model, 2, 1, cfg.data.size)[0].head
    svc = SplitServicer(cfg, "jumps", head, make_optimizer(list(head.parameters()), cfg.train), None,
                        Coordinator(2, False, "backward"))
    server, port = serve(svc, "127.0.0.1:0", pki.root / "server", False)
    s0 = pki.site("site-0")
    channel = make_channel(f"127.0.0.1:{port}", channel_credentials(s0.ca_cert, s0.cert, s0.key), site="site-0",
                           token=read_token(s0.token))
    try:
        client = RemoteSplitServer(channel, 0, "jumps", config_fingerprint(cfg))
        client.connect()
        client._seq = 1_000_000 - 1  # the next call carries sequence 1,000,000
        with pytest.raises(RemoteError) as info:
            client.get_turn(0, 0, 0)
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS and info.value.error_code == pb.ERROR_CODE_REPLAYED
        assert info.value.detail.highest_sequence == 0 and "jumps more than" in info.value.detail.message
        client._seq = 0
        assert client.get_turn(0, 0, 0).state == pb.TURN_STATE_WAIT  # sequence 1: the session goes on
        jump = max_sequence_jump(svc.sessions.window)
        client._seq = 1 + jump  # next: 2 + jump
        with pytest.raises(RemoteError) as info:
            client.get_turn(0, 0, 0)
        assert info.value.error_code == pb.ERROR_CODE_REPLAYED
        client._seq = jump  # next: 1 + jump, the largest jump allowed
        client.get_turn(0, 0, 0)
        assert svc.sessions.highest[0] == 1 + jump
    finally:
        channel.close()
        server.stop(grace=0)
