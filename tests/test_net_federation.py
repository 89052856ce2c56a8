"""FedAvg over gRPC with mutual TLS: the server and each hospital as separate processes (or threads for the
protocol checks), compared with the in-process federation."""
from __future__ import annotations

import os
import signal
import threading

import grpc
import numpy as np
import pytest
import torch

from splitfl.net import PROTOCOL_VERSION, split_payload
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.proto import splitfl_pb2_grpc as pb_grpc
from net_harness import Federation
from net_harness import history as _history
from net_harness import kill as _kill
from net_harness import wait_for as _wait_for
from test_train import tiny_config


def net_config(secure: str = "none", epochs: int = 2):
    """3 IID sites of 32 images, timm's test_resnet, batch 32."""
    cfg = tiny_config(regime="fedavg")
    cfg.model.name = "test_resnet"
    cfg.data.n_train = 96
    cfg.data.partition.num_sites = 3
    cfg.train.epochs = epochs
    cfg.fed.secure = secure
    return cfg


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The in-process reference run (splitfl.train.run) of net_config()."""
    from splitfl.train import run

    torch.set_num_threads(2)
    return run(net_config(), tmp_path_factory.mktemp("inproc"))


@pytest.mark.slow
def test_simulate_fedavg_equals_the_in_process_run(tmp_path, in_process):
    from splitfl.net.launch import simulate

    remote = simulate(net_config(), tmp_path, round_timeout=60, timeout=300)
    assert remote["test"]["auroc_macro"] == pytest.approx(in_process["test"]["auroc_macro"], abs=1e-6)
    assert remote["val"]["auroc_macro"] == pytest.approx(in_process["val"]["auroc_macro"], abs=1e-6)
    assert remote["test"]["loss"] == pytest.approx(in_process["test"]["loss"], abs=1e-6)
    assert remote["best_epoch"] == in_process["best_epoch"]
    assert [r["accepted"] for r in _history(tmp_path / "server")] == ["3", "3"]
    for i in range(3):
        assert "the run is over" in (tmp_path / "logs" / f"site-{i}.log").read_text()
    assert (tmp_path / "server" / "checkpoint.pt").exists() and (tmp_path / "server" / "config.yaml").exists()


@pytest.mark.slow
def test_fedavg_he_over_grpc_matches_and_the_server_never_holds_the_secret_key(tmp_path, in_process):
    """The server reads only the public context; a key-holding site decrypts each round's sum."""
    from splitfl.net.launch import simulate

    remote = simulate(net_config("he"), tmp_path, round_timeout=60, timeout=300)
    # in-process he equals in-process plaintext to 1e-6 (tests/test_fed.py); compare with the plaintext reference
    assert remote["test"]["auroc_macro"] == pytest.approx(in_process["test"]["auroc_macro"], abs=1e-4)
    assert remote["protocol"]["secure"] == "he" and remote["protocol"]["server_has_secret_key"] is False
    server_files = [p.name for p in (tmp_path / "server").rglob("*")]
    assert not any("secret" in name for name in server_files)
    server_log = (tmp_path / "logs" / "server.log").read_text()
    assert "secret" not in server_log.lower()
    decrypted = sum("decrypted the aggregate" in (tmp_path / "logs" / f"site-{i}.log").read_text() for i in range(3))
    assert decrypted >= 1  # rounds' sums were decrypted by a site, not by the server


@pytest.mark.slow
def test_a_killed_hospital_is_dropped_and_can_rejoin(tmp_path):
    fed = Federation(net_config(epochs=3), tmp_path, round_timeout=15)
    try:
        fed.start_server()
        for i in range(3):
            fed.start_site(i)
        _wait_for(lambda: "round 1: loss" in fed.log("site-2"), 180, "site 2's first round")
        _kill(fed.procs["site-2"])  # SIGKILL right after its round-1 upload
        _wait_for(lambda: "site 2 did not submit" in fed.log("server"), 60, "the server to drop site 2")
        fed.start_site(2)  # the hospital comes back
        metrics = fed.wait_server()
        accepted = [int(r["accepted"]) for r in _history(tmp_path / "server")]
        assert len(accepted) == 3 and accepted[0] == 3 and 2 in accepted
        assert np.isfinite(metrics["test"]["auroc_macro"])
        fed.procs["site-2"].wait(timeout=60)
        assert fed.log("site-2").count("joined run") >= 2  # it joined again after the kill
        if accepted[1] == 2:  # dropped in round 2: the rejoined site trained round 3
            assert accepted[2] == 3 and "round 3: loss" in fed.log("site-2")
    finally:
        fed.close()


@pytest.mark.slow
def test_a_restarted_server_resumes_and_the_sites_reconnect(tmp_path, in_process):
    """Under fed.secure masks (pairwise-masked secure aggregation over SecAggSubmit/SecAggFetch), so the sites
    also redo an interrupted key agreement with the restarted server."""
    fed = Federation(net_config("masks"), tmp_path, round_timeout=60)
    try:
        fed.start_server()
        for i in range(3):
            fed.start_site(i)
        _wait_for(lambda: len(_history(tmp_path / "server")) >= 1, 180, "round 1's checkpoint")
        _kill(fed.procs["server"])
        fed.start_server()  # same out dir, same port
        metrics = fed.wait_server()
        assert "resuming from" in fed.log("server")
        for i in range(3):
            fed.procs[f"site-{i}"].wait(timeout=60)
            assert fed.procs[f"site-{i}"].returncode == 0, fed.log(f"site-{i}")[-2000:]
        assert len(_history(tmp_path / "server")) == 2
        # same seeds, same rounds: the interrupted federation ends where the uninterrupted one does
        # (masked sums are exact in fixed point: equal to plain FedAvg to ~1e-9 per coordinate)
        assert metrics["test"]["auroc_macro"] == pytest.approx(in_process["test"]["auroc_macro"], abs=1e-6)
        assert metrics["protocol"]["secure"] == "masks"
        assert "masked update sent and unmasked" in fed.log("site-0")
    finally:
        fed.close()


@pytest.mark.slow
def test_masks_a_site_killed_after_sharing_keys_is_recovered_from_the_survivors_shares(tmp_path):
    """fed.secure masks over gRPC: site 2 is SIGKILLed right after ShareKeys, before its masked input.

    The survivors' Shamir shares of its mask key remove its pairwise masks (Bonawitz et al.'s dropout
    recovery), so the round's aggregate is plaintext FedAvg over sites 0 and 1, computed here in process.
    """
    from splitfl.data import load_splits
    from splitfl.fed.aggregate import aggregate
    from splitfl.fed.runner import FedRunner
    from splitfl.net.fed.hospital import DIE_AFTER_ENV
    from splitfl.net.launch import server_command, site_command, start
    from splitfl.engine import make_fabric

    cfg = net_config("masks", epochs=1)
    fed = Federation(cfg, tmp_path, round_timeout=120)  # the local training before AdvertiseKeys, on a busy machine
    try:
        # the steps after AdvertiseKeys wait 10 s (--phase-timeout): the survivors wait that long for site 2's masked input
        fed.procs["server"] = start(server_command(fed.config, tmp_path / "server", fed.pki / "server", fed.address, False, 120, 10),
                                    tmp_path / "logs" / "server.log")
        for i in range(2):
            fed.start_site(i)
        fed.procs["site-2"] = start(site_command(fed.config, 2, fed.address, fed.pki / "sites" / "site-2", tmp_path / "sites" / "site-2", False),
                                    tmp_path / "logs" / "site-2.log", env={DIE_AFTER_ENV: "share_keys"})
        # the reference, while the processes start: the survivors' round-1 updates
        # from the same initial model, aggregated in plaintext
        torch.set_num_threads(2)
        fabric = make_fabric(cfg.train)
        fabric.seed_everything(cfg.seed, verbose=False)
        ref = FedRunner(fabric, cfg, load_splits(cfg.data), tmp_path / "ref")
        updates = [ref.local_update(s, 0, cfg.train.lr)[0] for s in (0, 1)]
        mean = aggregate(updates, [float(len(ref.sites[s])) for s in (0, 1)], "mean")
        expected = ref.global_flat + cfg.fed.server_lr * mean

        assert fed.procs["site-2"].wait(timeout=120) == -signal.SIGKILL, fed.log("site-2")[-2000:]
        assert "share_keys: dying now" in fed.log("site-2")

        for i in range(2):  # the survivors finish when the server says the run is over (it then lingers for site 2)
            assert fed.procs[f"site-{i}"].wait(timeout=120) == 0, fed.log(f"site-{i}")[-2000:]
            assert "masked update sent and unmasked" in fed.log(f"site-{i}")
        assert [int(r["accepted"]) for r in _history(tmp_path / "server")] == [2]
        assert "masked sum of 2 update(s) of 3 sampled" in fed.log("server")
        state = torch.load(tmp_path / "server" / "checkpoint.pt", map_location="cpu", weights_only=False)
        got = np.asarray(state["runner"]["core"]["global_flat"], dtype=np.float64)
    finally:
        fed.close()
    assert np.abs(got - expected).max() < 1e-6
    assert np.abs(got - ref.global_flat).max() > 1e-4  # the round moved the model


# ----------------------------------------------------------------------------- protocol checks (threads)


@pytest.fixture
def live_server(tmp_path):
    """A FederationServer on 127.0.0.1 with mutual TLS, 2 sites, driven round by round from the test."""
    from splitfl.data import load_splits
    from splitfl.fed.flat import FlatSpec
    from splitfl.fed.server import FedServerCore, build_fed_model
    from splitfl.net.certs import make_dev_pki
    from splitfl.net.fed.servicer import FederationServer, make_server

    cfg = net_config()
    cfg.data.partition.num_sites = 2
    pki = make_dev_pki(tmp_path / "pki", 2)
    splits = load_splits(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_fed_model(cfg, splits.task.num_outputs, splits.task.n_channels)
    spec = FlatSpec(model)
    core = FedServerCore(cfg, spec.size, spec.flatten(model), None, log=lambda m: None)
    servicer = FederationServer(cfg, core, round_timeout=30, max_payload=64 << 20, log=lambda m: None)
    server, port = make_server(servicer, "127.0.0.1:0", pki.root / "server", insecure=False)
    yield cfg, pki, servicer, f"127.0.0.1:{port}", tmp_path
    servicer.finish()
    server.stop(grace=0)


def _channel(pki, site: str, address: str, token: str | None = None):
    from splitfl.net.certs import read_token
    from splitfl.net.tls import channel_credentials, make_channel

    sp = pki.site(site)
    creds = channel_credentials(sp.ca_cert, sp.cert, sp.key)
    return make_channel(address, creds, site=site, token=token or read_token(sp.token))


def _refused(call, status: grpc.StatusCode, code: int | None = None):
    from splitfl.net.fed.common import error_detail

    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == status, info.value.details()
    detail = error_detail(info.value)
    if code is not None:
        assert detail is not None and detail.code == code, (detail, info.value.details())
    return detail


def test_bad_requests_are_refused_and_a_good_site_completes_its_round(live_server):
    from splitfl.net.fed.common import run_fingerprint
    from splitfl.net.fed.hospital import FedSiteClient

    cfg, pki, servicer, address, tmp = live_server
    good_channel = _channel(pki, "site-0", address)
    good = FedSiteClient(cfg, 0, good_channel, tmp / "site-0", log=lambda m: None)
    good_thread = threading.Thread(target=good.run, kwargs={"poll_ms": 500}, daemon=True)
    good_thread.start()

    # the misbehaving hospital: site-1's certificate and token
    channel = _channel(pki, "site-1", address)
    stub = pb_grpc.FederationServiceStub(channel)
    run_id, fp = servicer.run_id, run_fingerprint(cfg)

    def hdr(seq=0, session=b"", version=PROTOCOL_VERSION, run=None):
        return pb.RequestHeader(protocol_version=version, run_id=run or run_id, config_fingerprint=fp, site_id=1,
                                session_id=session, sequence=seq)

    def join(nonce):
        return list(stub.Join(pb.JoinRequest(header=hdr(), client_nonce=nonce, sample_count=48), timeout=10))

    status = stub.Status(pb.StatusRequest(header=hdr(version=99)), timeout=10)
    assert list(status.supported_versions) == [1] and not status.header_ok
    detail = _refused(lambda: list(stub.Join(pb.JoinRequest(header=hdr(version=99), client_nonce=os.urandom(16), sample_count=48), timeout=10)),
                      grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_UNSUPPORTED_VERSION)
    assert list(detail.supported_versions) == [1]
    _refused(lambda: list(stub.Join(pb.JoinRequest(header=hdr(run="another-run"), client_nonce=os.urandom(16), sample_count=48), timeout=10)),
             grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_RUN_MISMATCH)
    nonce = os.urandom(16)
    session = join(nonce)[0].run.session.session_id
    _refused(lambda: join(nonce), grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED)  # replayed Join
    # wrong token (right certificate): refused by the interceptor before any handler runs
    bad_stub = pb_grpc.FederationServiceStub(_channel(pki, "site-1", address, token="not-the-token"))
    _refused(lambda: bad_stub.GetRound(pb.GetRoundRequest(header=hdr(1, session)), timeout=10), grpc.StatusCode.UNAUTHENTICATED)
    # site-1's token with a header claiming site 0
    _refused(lambda: stub.GetRound(pb.GetRoundRequest(header=pb.RequestHeader(
        protocol_version=1, run_id=run_id, config_fingerprint=fp, site_id=0, session_id=session, sequence=1)), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED, pb.ERROR_CODE_SITE_MISMATCH)

    _wait_for(lambda: servicer.core.site_sizes[0] is not None, 60, "the good site to join")
    lr = cfg.train.lr
    result = {}
    coordinator = threading.Thread(target=lambda: result.update(zip(("loss", "extras"), servicer.run_round(0, lr))), daemon=True)
    coordinator.start()

    info = stub.GetRound(pb.GetRoundRequest(header=hdr(1, session), min_round=0, max_wait_ms=10_000), timeout=20)
    assert info.state == pb.ROUND_STATE_TRAINING and info.sampled
    detail = _refused(lambda: stub.GetRound(pb.GetRoundRequest(header=hdr(1, session)), timeout=10),
                      grpc.StatusCode.ALREADY_EXISTS, pb.ERROR_CODE_REPLAYED)  # replayed sequence
    assert detail.highest_sequence == 1
    _refused(lambda: stub.GetRound(pb.GetRoundRequest(header=hdr(2, os.urandom(16))), timeout=10),
             grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_UNKNOWN_SESSION)

    size = servicer.core.size
    good_update = np.random.default_rng(0).normal(0, 1e-3, size).astype(np.float32)
    from splitfl.fed.server import vector_bytes

    payload = vector_bytes(good_update)
    seq = [2]

    def submit(chunks, declared=None, data=payload):
        seq[0] += 1
        tid = chunks[0].transfer_id
        meta = pb.UpdateMeta(round=0, sample_count=48, train_loss=0.5,
                             parts=[pb.UpdatePart(encoding=pb.UPDATE_ENCODING_FLOAT32, transfer_id=tid, size=declared or len(data))])

        def messages():
            yield pb.SubmitUpdateRequest(header=hdr(seq[0], session), meta=meta)
            for c in chunks:
                yield pb.SubmitUpdateRequest(chunk=c)

        return stub.SubmitUpdate(messages(), timeout=20)

    tampered = list(split_payload(payload, 64 * 1024))
    tampered[1] = pb.Chunk(transfer_id=tampered[1].transfer_id, index=1, total_chunks=tampered[1].total_chunks,
                           total_size=tampered[1].total_size, data=bytes(b ^ 0xFF for b in tampered[1].data))  # flipped bits
    _refused(lambda: submit(tampered), grpc.StatusCode.DATA_LOSS, pb.ERROR_CODE_BAD_CHUNKS)
    _refused(lambda: submit(list(split_payload(payload)), declared=1 << 40), grpc.StatusCode.RESOURCE_EXHAUSTED, pb.ERROR_CODE_TOO_LARGE)
    # a well-formed update with NaNs: received, refused by the receipt checks, the round goes on
    nan_payload = vector_bytes(np.full(size, np.nan, np.float32))
    resp = submit(list(split_payload(nan_payload)), data=nan_payload)
    assert not resp.accepted and "NaN" in resp.reason
    _refused(lambda: submit(list(split_payload(payload))), grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_CODE_OUT_OF_ORDER)  # twice

    coordinator.join(timeout=60)
    assert result["extras"]["accepted"] == 1  # the good site's update, after all that
    assert [(r.site, r.round) for r in servicer.core.rejections] == [(1, 1)]
    assert not np.array_equal(servicer.core.global_flat, np.asarray(servicer.core.global_flat) * 0)  # a model remains
    servicer.finish()
    good_thread.join(timeout=30)
    assert good.rounds_trained == [0]
    channel.close()
    good_channel.close()


# ----------------------------------------------------------------------------- launch / CLI (fast)


def test_split_regimes_dispatch_to_the_split_service(tmp_path, monkeypatch):
    from splitfl.net import launch

    cfg = net_config()
    cfg.regime = "split-plain"
    calls = []
    monkeypatch.setattr(launch, "run_split_server", lambda *a, **kw: calls.append(("server", a, kw)) or {"test": {}})
    monkeypatch.setattr(launch, "run_split_site", lambda *a, **kw: calls.append(("site", a, kw)))
    launch.serve(cfg, tmp_path / "server", tmp_path / "pki", "127.0.0.1:5", True, round_timeout=7)
    assert calls[0][1][2:] == ("127.0.0.1:5", tmp_path / "pki", True) and calls[0][2]["round_timeout"] == 7
    assert launch.join(cfg, 0, "127.0.0.1:1", tmp_path / "pki", tmp_path / "site") == []
    assert calls[1][0] == "site" and calls[1][1][1:] == (0, "127.0.0.1:1", tmp_path / "pki", False, tmp_path / "site")


def test_cli_has_serve_join_simulate_and_insecure_is_an_explicit_flag():
    from splitfl.cli import build_parser

    parser = build_parser()
    ns = parser.parse_args(["serve", "--out", "o", "--pki", "p", "--address", "127.0.0.1:0", "--round-timeout", "5"])
    assert ns.serve.insecure is False and ns.serve.round_timeout == 5.0
    assert parser.parse_args(["join", "--site", "2", "--server", "h:1", "--pki", "p", "--out", "o", "--insecure"]).join.insecure
    assert parser.parse_args(["simulate", "--out", "o", "--sites", "3"]).simulate.sites == 3


def test_plaintext_needs_the_insecure_flag_and_warns(tmp_path):
    from splitfl.fed.server import FedServerCore
    from splitfl.net.certs import make_dev_pki
    from splitfl.net.fed.servicer import FederationServer, make_server
    from splitfl.net.tls import InsecureChannelError, InsecureChannelWarning, make_channel

    make_dev_pki(tmp_path / "pki", 3)
    cfg = net_config()
    servicer = FederationServer(cfg, FedServerCore(cfg, 4, np.zeros(4, np.float32), None), log=lambda m: None)
    with pytest.raises(InsecureChannelError, match="--insecure"):
        make_channel("127.0.0.1:1", None, insecure=False)  # what `join` opens without certificates
    with pytest.warns(InsecureChannelWarning):
        server, port = make_server(servicer, "127.0.0.1:0", tmp_path / "pki" / "server", insecure=True)
    server.stop(grace=0)
    assert port > 0
