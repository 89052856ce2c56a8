"""split-he / split-plain over gRPC with mutual TLS: a real server and two hospitals, checked against the in-process run."""
from __future__ import annotations

import csv
import json
import shutil
import threading

import grpc
import pytest
import torch
from test_train import tiny_config

from splitfl.net.certs import load_pki, make_dev_pki, read_token
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.split.common import RelaySealer, RemoteError, config_fingerprint, ensure_consortium_keys
from splitfl.net.split.hospital import RemoteSplitServer, run_split_site
from splitfl.net.split.server import run_split_server
from splitfl.net.tls import channel_credentials, make_channel
from splitfl.tensors import ProtocolError
from splitfl.train import run


def net_config(regime: str = "split-he", freeze: bool = True, epochs: int = 2):
    cfg = tiny_config(regime=regime)
    cfg.model.name = "test_resnet"
    cfg.model.freeze_encoder = freeze
    cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 96, 64, 64
    cfg.data.partition.num_sites = 2
    cfg.train.batch_size = 32
    cfg.train.epochs = epochs
    return cfg


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"), 2)


def _distributed(cfg, tmp_path, pki, *, while_serving=None, sites=(0, 1), insecure=False, keys_at_pki_root=False,
                 site_kw=None, **server_kw):
    """Server in a thread, two hospitals in threads, mutual TLS on 127.0.0.1. Returns (metrics, out folder)."""
    out = tmp_path / "server"
    site_dirs = [tmp_path / f"site{i}" for i in range(2)]
    # The consortium's secret is made once by the hospitals and shared among them only.
    if keys_at_pki_root:  # as `splitfl simulate` lays it out: each hospital copies it from <pki>/ at start
        ensure_consortium_keys(cfg, pki.root)
    else:
        keys = tmp_path / "consortium"
        ensure_consortium_keys(cfg, keys / "keys")
        for d in site_dirs:
            shutil.copytree(keys / "keys", d / "keys")
    ready, result, errors = threading.Event(), {}, []
    port = {}

    def on_ready(p):
        port["p"] = p
        ready.set()

    def server():
        try:
            kw = {"turn_timeout_s": 30, "join_timeout_s": 60, "eval_timeout_s": 60, "finish_grace_s": 5, **server_kw}
            result["m"] = run_split_server(cfg, out, "127.0.0.1:0", pki.root / "server", insecure, on_ready=on_ready, **kw)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            ready.set()

    st = threading.Thread(target=server, daemon=True)
    st.start()
    assert ready.wait(60) and not errors, errors
    addr = f"127.0.0.1:{port['p']}"
    if while_serving is not None:
        while_serving(addr)

    def site(i):
        try:
            run_split_site(cfg, i, addr, pki.root / "sites" / f"site-{i}", insecure, site_dirs[i], poll_ms=500,
                           **(site_kw or {}))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=site, args=(i,), daemon=True) for i in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    st.join(60)
    assert not errors, errors
    assert not st.is_alive()
    return result["m"], out


def _head(folder):
    state = torch.load(folder / "best_model.pt", weights_only=False)["model"]
    return {k: v for k, v in state.items() if k.startswith("head.")}


def _compare(local, remote, local_dir, remote_dir, atol=1e-5):
    h1, h2 = _head(local_dir), _head(remote_dir)
    assert h1.keys() == h2.keys() and h1
    worst = max((h1[k].float() - h2[k].float()).abs().max().item() for k in h1)
    assert worst < atol, worst
    assert remote["best_epoch"] == local["best_epoch"]
    assert remote["test"]["auroc_macro"] == pytest.approx(local["test"]["auroc_macro"], abs=1e-4)
    assert remote["val"]["auroc_macro"] == pytest.approx(local["val"]["auroc_macro"], abs=1e-4)


def test_split_he_linear_probe_over_grpc_matches_in_process(tmp_path, pki):
    cfg = net_config("split-he", freeze=True, epochs=2)
    cfg.train.batch_size = 16  # three steps per hospital per epoch: the turns interleave 0, 1, 0, 1, 0, 1
    local = run(cfg, tmp_path / "local")
    remote, out = _distributed(cfg, tmp_path, pki)
    _compare(local, remote, tmp_path / "local", out)
    assert remote["protocol"]["server_has_secret_key"] is False
    assert remote["protocol"]["encoder_relay"] is False
    # the same messages cross the wire as in process (CKKS ciphertext sizes vary slightly with compression)
    assert remote["wire"]["train_bytes_up"] == pytest.approx(local["wire"]["train_bytes_up"], rel=0.05)  # ciphertexts compress by a few %
    for f in ("metrics.json", "history.csv", "checkpoint.pt", "best_model.pt"):
        assert (out / f).exists()


@pytest.mark.parametrize("regime, enc_tol", [("split-plain", 1e-5), ("split-he", 1e-3)])
def test_trainable_encoder_relayed_sealed_over_grpc(tmp_path, pki, regime, enc_tol):
    """The shared encoder is relayed hospital to hospital through the server as an AES-GCM blob it cannot open.

    split-plain is deterministic: the relayed encoder equals the in-process one to float precision. In
    split-he, CKKS noise in the activation gradients is amplified by Adam's first steps (|step| ~ lr), so the
    encoder is compared with a tolerance of lr; the head and the metrics are still compared tightly.
    """
    cfg = net_config(regime, freeze=False, epochs=1)
    local = run(cfg, tmp_path / "local")
    remote, out = _distributed(cfg, tmp_path, pki)
    _compare(local, remote, tmp_path / "local", out)
    assert remote["protocol"]["encoder_relay"] is True
    assert remote["protocol"]["server_has_secret_key"] is False
    best = torch.load(out / "best_model.pt", weights_only=False)["model"]
    sealed = best["_relay.sealed"].numpy().tobytes()
    assert not any(k.startswith("encoder.") for k in best)  # the server never held encoder weights
    key_file = "consortium.secret" if regime == "split-he" else "relay.secret"
    secret = (tmp_path / "site0" / "keys" / key_file).read_bytes()
    run_id = f"split-{config_fingerprint(cfg).hex()[:16]}"
    sealer = RelaySealer(secret, run_id, config_fingerprint(cfg))
    import io

    state = torch.load(io.BytesIO(sealer.open(sealed, int(best["_relay.version"]))), weights_only=False)
    local_enc = {k[len("encoder."):]: v for k, v in
                 torch.load(tmp_path / "local" / "best_model.pt", weights_only=False)["model"].items()
                 if k.startswith("encoder.")}
    worst = max((state["encoder"][k].float() - local_enc[k].float()).abs().max().item() for k in local_enc)
    assert worst < enc_tol, worst
    with pytest.raises(ProtocolError, match="does not open"):
        sealer.open(sealed, int(best["_relay.version"]) - 1)  # a replayed/old version number fails
    with pytest.raises(ProtocolError, match="does not open"):
        RelaySealer(b"x" * 32, run_id, config_fingerprint(cfg)).open(sealed, int(best["_relay.version"]))


def test_bad_payload_and_wrong_token_are_refused_and_the_server_keeps_serving(tmp_path, pki):
    cfg = net_config("split-plain", freeze=True, epochs=1)
    run_id = f"split-{config_fingerprint(cfg).hex()[:16]}"
    seen = {}

    def attack(addr):
        s0 = load_pki(pki.root).site("site-0")
        creds = channel_credentials(s0.ca_cert, s0.cert, s0.key)
        # wrong token: refused by the interceptor before any handler runs
        bad = RemoteSplitServer(make_channel(addr, creds, site="site-0", token="not-the-token"), 0, run_id,
                                config_fingerprint(cfg))
        with pytest.raises(RemoteError) as e:
            bad.connect(96)
        seen["token"] = e.value.code
        # another site's token over site-0's certificate: refused too
        other = RemoteSplitServer(make_channel(addr, creds, site="site-1", token=read_token(pki.site("site-1").token)),
                                  1, run_id, config_fingerprint(cfg))
        with pytest.raises(RemoteError):
            other.connect(96)
        # a genuine site sending a malformed forward payload: INVALID_ARGUMENT / BAD_PAYLOAD, nothing changes
        good = RemoteSplitServer(make_channel(addr, creds, site="site-0", token=read_token(s0.token)), 0, run_id,
                                 config_fingerprint(cfg))
        good.connect(96)
        status = good.status()
        seen["status"] = (status.run_id, list(status.supported_versions))
        with pytest.raises(RemoteError) as e:
            good.forward(b"garbage-bytes", train=False)
        seen["payload"] = (e.value.code, e.value.error_code)
        # wrong run id: refused
        stale = RemoteSplitServer(make_channel(addr, creds, site="site-0", token=read_token(s0.token)), 0, "other-run",
                                  config_fingerprint(cfg))
        with pytest.raises(RemoteError) as e:
            stale.connect(96)
        seen["run"] = e.value.error_code
        # the server still answers a valid call on the same session
        from splitfl.tensors import tensor_from_bytes, tensor_to_bytes

        logits = tensor_from_bytes(good.forward(tensor_to_bytes(torch.zeros(4, 96)), train=False), "logits", (4, 2))
        seen["ok"] = tuple(logits.shape)
        # a replayed sequence number is refused
        good._seq -= 1
        with pytest.raises(RemoteError) as e:
            good.forward(tensor_to_bytes(torch.zeros(4, 96)), train=False)
        seen["replay"] = e.value.error_code

    metrics, _ = _distributed(cfg, tmp_path, pki, while_serving=attack)
    assert seen["token"] == grpc.StatusCode.UNAUTHENTICATED
    assert seen["payload"] == (grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_CODE_BAD_PAYLOAD)
    assert seen["run"] == pb.ERROR_CODE_RUN_MISMATCH
    assert seen["ok"] == (4, 2)
    assert seen["status"] == (run_id, [1])
    assert seen["replay"] == pb.ERROR_CODE_REPLAYED
    assert metrics["test"]["auroc_macro"] >= 0  # training went on after the attacks


def test_a_hospital_that_never_comes_stops_the_server_before_any_epoch_is_recorded(tmp_path, pki):
    """Every hospital must come to the first epoch a server runs (within join_timeout_s): one that never joins stops
    the run with an error naming it, how long the server waited and the option to raise, and no epoch (let alone an
    empty one) reaches history.csv or the checkpoint. (One that joined and later goes silent is skipped instead:
    test_a_hospital_that_dies_holding_its_turn_is_skipped_and_training_goes_on.) Before, the server trained on
    without it, and with no hospital in time it recorded an empty first epoch (train_loss 0)."""
    cfg = net_config("split-plain", freeze=False, epochs=2)
    with pytest.raises(AssertionError, match=r"site-1 never joined: waited \d+ s \(join timeout 2 s\).*--join-timeout"):
        _distributed(cfg, tmp_path, pki, sites=(0,), join_timeout_s=2, turn_timeout_s=2, finish_grace_s=1,
                     site_kw={"reconnect_timeout_s": 1})
    out = tmp_path / "server"
    assert not (out / "history.csv").exists() and not (out / "checkpoint.pt").exists()


def test_server_crash_resumes_from_checkpoint_and_hospitals_reconnect(tmp_path, pki, monkeypatch):
    """The server dies after epoch 1's checkpoint; rerun on the same folder, it resumes; hospitals rejoin by themselves.

    The result equals the uninterrupted in-process run (split-plain, relayed trainable encoder: deterministic).
    """
    import socket

    from splitfl.net.split.server import RemoteServerRunner

    cfg = net_config("split-plain", freeze=False, epochs=2)
    local = run(cfg, tmp_path / "local")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "server"
    for i in range(2):
        (tmp_path / f"site{i}" / "keys").mkdir(parents=True)
        (tmp_path / f"site{i}" / "keys" / "relay.secret").write_bytes(b"r" * 32)

    class Crash(RuntimeError):
        pass

    real = RemoteServerRunner.train_epoch

    def crashing(self, epoch, desc):
        if epoch == 1:
            raise Crash("power cut")
        return real(self, epoch, desc)

    errors, result = [], {}

    def serve(crash):
        try:
            result["m"] = run_split_server(cfg, out, addr, pki.root / "server", False, turn_timeout_s=30, join_timeout_s=60,
                                           eval_timeout_s=60, finish_grace_s=5)
        except Crash:
            pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def site(i):
        try:
            run_split_site(cfg, i, addr, pki.root / "sites" / f"site-{i}", False, tmp_path / f"site{i}", poll_ms=300,
                           reconnect_timeout_s=60)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    monkeypatch.setattr(RemoteServerRunner, "train_epoch", crashing)
    first = threading.Thread(target=serve, args=(True,), daemon=True)
    first.start()
    sites = [threading.Thread(target=site, args=(i,), daemon=True) for i in range(2)]
    for t in sites:
        t.start()
    first.join(120)
    assert not first.is_alive() and not errors, errors
    assert (out / "checkpoint.pt").exists() and "m" not in result
    monkeypatch.setattr(RemoteServerRunner, "train_epoch", real)
    second = threading.Thread(target=serve, args=(False,), daemon=True)
    second.start()
    second.join(120)
    for t in sites:
        t.join(60)
    assert not errors, errors
    _compare(local, result["m"], tmp_path / "local", out)


def test_split_he_dp_noise_state_travels_in_the_sealed_relay(tmp_path, pki):
    """With DP noise the hospitals draw from one shared noise stream in turn: it is relayed, so the run equals in-process.

    The accountants travel sealed too; the hospitals report their spent epsilon at EndEpoch, so the server's
    history and metrics.json carry the in-process run's epsilon and privacy section.
    """
    cfg = net_config("split-he", freeze=True, epochs=2)
    cfg.split.dp_noise_multiplier, cfg.split.dp_max_grad_norm = 1.0, 1.0
    local = run(cfg, tmp_path / "local")
    own_pki = make_dev_pki(tmp_path / "pki", 2)
    remote, out = _distributed(cfg, tmp_path, own_pki, keys_at_pki_root=True)
    assert (tmp_path / "site0" / "keys" / "consortium.secret").read_bytes() == (own_pki.root / "consortium.secret").read_bytes()
    assert not (out / "keys").exists()  # the server's folder never gets the key
    _compare(local, remote, tmp_path / "local", out)
    assert remote["protocol"]["encoder_relay"] is True
    mine, theirs = remote["privacy"], local["privacy"]
    assert mine.keys() == theirs.keys() and theirs["epsilon"] > 0
    assert mine["epsilon"] == pytest.approx(theirs["epsilon"], abs=1e-9)
    assert mine["epsilon_per_site"] == pytest.approx(theirs["epsilon_per_site"], abs=1e-9)
    assert {k: v for k, v in mine.items() if "epsilon" not in k} == {k: v for k, v in theirs.items() if "epsilon" not in k}
    assert json.loads((out / "metrics.json").read_text())["privacy"] == mine
    per_epoch = [float(r["epsilon"]) for r in csv.DictReader((tmp_path / "local" / "history.csv").open())]
    assert len(per_epoch) == 2 and per_epoch[0] < per_epoch[1]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [float(r["epsilon"]) for r in rows] == pytest.approx(per_epoch, abs=1e-9)


@pytest.mark.filterwarnings("ignore::splitfl.net.tls.InsecureChannelWarning")
def test_split_he_mlp_head_layer_by_layer_over_grpc(tmp_path, pki):
    """cut: mlp, both affine layers on ciphertexts, the hospital applies the activation in between (tokens, no TLS)."""
    cfg = net_config("split-he", freeze=False, epochs=1)
    cfg.model.cut, cfg.model.mlp_hidden = "mlp", 16
    local = run(cfg, tmp_path / "local")
    remote, out = _distributed(cfg, tmp_path, pki, insecure=True)
    _compare(local, remote, tmp_path / "local", out)


def test_split_he_noninteractive_predict_over_grpc(tmp_path, pki):
    """Evaluation through Predict: the whole polynomial MLP head on ciphertexts (Galois keys in the uploaded context)."""
    cfg = net_config("split-he", freeze=True, epochs=1)
    cfg.model.cut, cfg.model.mlp_hidden, cfg.model.mlp_activation = "mlp", 8, "square"
    cfg.split.he_preset, cfg.split.mlp_inference = "deep", "noninteractive"
    local = run(cfg, tmp_path / "local")
    remote, out = _distributed(cfg, tmp_path, pki)
    _compare(local, remote, tmp_path / "local", out)


def test_a_hospital_that_dies_holding_its_turn_is_skipped_and_training_goes_on(tmp_path, pki, monkeypatch):
    class Died(RuntimeError):
        pass

    real = RemoteSplitServer.backward
    calls = {"n": 0}

    def dying(self, payload, layer=None):
        if self.site == 1:
            calls["n"] += 1
            if calls["n"] == 2:  # site 1 crashes in its second step, after its forward: it holds the turn
                raise Died("hospital 1 lost power")
        return real(self, payload, layer)

    monkeypatch.setattr(RemoteSplitServer, "backward", dying)
    cfg = net_config("split-plain", freeze=False, epochs=2)
    cfg.train.batch_size = 16
    with pytest.raises(AssertionError, match="Died"):
        _distributed(cfg, tmp_path, pki, join_timeout_s=3, turn_timeout_s=2, finish_grace_s=1)
    rows = list(csv.DictReader((tmp_path / "server" / "history.csv").open()))
    assert [int(r["sites_skipped"]) for r in rows] == [1, 1]
    assert (tmp_path / "server" / "metrics.json").exists()
