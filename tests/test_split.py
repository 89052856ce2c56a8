"""Split learning end to end: split-plain matches centralized; the server's view is recorded; bad messages bounce."""
from __future__ import annotations

import json

import pytest
import torch
from test_train import tiny_config

from splitfl.split.server import SplitServer
from splitfl.tensors import ProtocolError, tensor_to_bytes
from splitfl.train import run


def one_step_config(regime: str):
    """One hospital, one batch, one epoch: exactly one optimisation step."""
    cfg = tiny_config(regime=regime)
    cfg.data.n_train = 64
    cfg.data.partition.num_sites = 1
    cfg.train.batch_size = 64
    cfg.train.epochs = 1
    cfg.train.optimizer = "sgd"  # Adam's first step divides by |g|: it would amplify float re-association noise
    cfg.train.lr = 0.05
    return cfg


def _weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "best_model.pt", weights_only=False)["model"]


def test_split_plain_step_equals_centralized_step(tmp_path):
    central = run(one_step_config("centralized"), tmp_path / "c")
    split = run(one_step_config("split-plain"), tmp_path / "s")
    w1, w2 = _weights(tmp_path / "c"), _weights(tmp_path / "s")
    assert w1.keys() == w2.keys()
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert worst < 1e-6, worst  # same batches, same optimiser maths, only float re-association
    assert split["val"]["auroc_macro"] == pytest.approx(central["val"]["auroc_macro"], abs=1e-4)
    assert split["protocol"]["server_has_secret_key"] is False


def test_split_plain_several_hospitals_with_transcript(tmp_path):
    cfg = tiny_config(regime="split-plain")
    cfg.data.partition.num_sites = 3
    cfg.train.epochs = 1
    cfg.split.transcript = True
    cfg.split.transcript_max_steps = 2
    metrics = run(cfg, tmp_path)
    assert metrics["protocol"]["hospitals"] == 3 and sum(metrics["protocol"]["site_sizes"]) == 192
    assert metrics["wire"]["bytes_per_sample_up"] > 512 * 4  # float32 activations of a pooled ResNet-18
    lines = [json.loads(l) for l in (tmp_path / "transcript" / "index.jsonl").read_text().splitlines()]
    assert {l["step"] for l in lines} == {0, 1}
    assert [l["kind"] for l in lines if l["step"] == 0] == ["activations_in", "logits_out", "logit_grads_in", "activation_grads_out"]
    first = tmp_path / "transcript" / lines[0]["file"]
    assert first.stat().st_size == lines[0]["bytes"]


def _plain_server() -> SplitServer:
    head = torch.nn.Linear(8, 3)
    return SplitServer(head, torch.optim.SGD(head.parameters(), lr=0.1), None, "plain")


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "not a splitfl tensor"),
        (b"garbage-bytes", "not a splitfl tensor"),
        (tensor_to_bytes(torch.zeros(4, 7)), "expected shape"),
        (tensor_to_bytes(torch.zeros(4, 8))[:-3], "truncated"),
        (tensor_to_bytes(torch.tensor([[float("nan")] * 8])), "NaN"),
        (tensor_to_bytes(torch.zeros(8)), "2-d"),
    ],
)
def test_plain_server_rejects_bad_messages_and_keeps_state(payload, match):
    server = _plain_server()
    before = {k: v.clone() for k, v in server.head.state_dict().items()}
    with pytest.raises(ProtocolError, match=match):
        server.forward(payload)
    with pytest.raises(ProtocolError):
        server.backward(tensor_to_bytes(torch.zeros(4, 3)))  # no forward was accepted
    assert all(torch.equal(before[k], v) for k, v in server.head.state_dict().items())
    server.forward(tensor_to_bytes(torch.ones(4, 8)))  # and it still serves


# ----------------------------------------------------------------------------- split-he

# CKKS tolerance for one training step at the 'default' preset (scale 2^40): the encrypted head is
# exact to ~1e-7 (see tests/test_he_linear.py); after one SGD step the weights may differ by that much.
HE_STEP_TOLERANCE = 1e-5


def test_split_he_step_equals_split_plain_step(tmp_path):
    plain = run(one_step_config("split-plain"), tmp_path / "p")
    he = run(one_step_config("split-he"), tmp_path / "h")
    w1, w2 = _weights(tmp_path / "p"), _weights(tmp_path / "h")
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert 0 < worst < HE_STEP_TOLERANCE, worst  # really encrypted (not bit-identical), and within tolerance
    assert he["val"]["auroc_macro"] == pytest.approx(plain["val"]["auroc_macro"], abs=1e-3)
    assert he["protocol"]["server_has_secret_key"] is False
    key_file = tmp_path / "h" / "keys" / "consortium.secret"
    assert key_file.exists() and (key_file.stat().st_mode & 0o077) == 0  # hospitals' file, owner-only
    assert he["wire"]["bytes_per_sample_up"] < 64 * 1024


@pytest.mark.parametrize("modality", ["fundus", "histology"])
def test_split_he_step_matches_plain_for_multiclass_heads(tmp_path, modality):
    """Ordinal 5-grade fundus (K=5) and 4-class histology (K=4), RGB: the packed head handles any K."""
    runs = {}
    for regime in ("split-plain", "split-he"):
        cfg = one_step_config(regime)
        cfg.data.modality = modality
        cfg.model.name = "resnet10t"
        runs[regime] = run(cfg, tmp_path / regime)
    w1, w2 = _weights(tmp_path / "split-plain"), _weights(tmp_path / "split-he")
    assert max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1) < HE_STEP_TOLERANCE
    assert runs["split-he"]["val"]["auroc_macro"] == pytest.approx(runs["split-plain"]["val"]["auroc_macro"], abs=1e-3)


def test_split_he_transcript_holds_only_ciphertexts_and_updates(tmp_path):
    cfg = tiny_config(regime="split-he")
    cfg.train.epochs = 1
    cfg.split.transcript = True
    cfg.split.transcript_max_steps = 1
    run(cfg, tmp_path)
    lines = [json.loads(l) for l in (tmp_path / "transcript" / "index.jsonl").read_text().splitlines()]
    assert [l["kind"] for l in lines] == [
        "activations_in", "logits_out", "logit_grads_in", "activation_grads_out", "head_update_in"]
    from splitfl.he.wire import EncryptedBatch

    raw = (tmp_path / "transcript" / lines[0]["file"]).read_bytes()
    secret = __import__("splitfl.he.keys", fromlist=["x"]).load_secret_context(tmp_path / "keys" / "consortium.secret")
    enc = EncryptedBatch.from_bytes(secret, raw, expect_kind="activations")  # a real ciphertext batch
    assert enc.batch == cfg.train.batch_size


def test_split_he_with_dp_reports_epsilon(tmp_path):
    cfg = tiny_config(regime="split-he")
    cfg.train.epochs = 1
    cfg.split.dp_noise_multiplier = 1.0
    cfg.split.dp_max_grad_norm = 1.0
    metrics = run(cfg, tmp_path)
    eps = metrics["privacy"]["epsilon"]
    assert 0 < eps < float("inf")
    assert len(metrics["privacy"]["epsilon_per_site"]) == 2


def test_he_server_rejects_tampered_ciphertext_and_keeps_state():
    from splitfl.he.keys import create_secret_context, public_context_bytes
    from splitfl.he.linear import PackedLinearHE
    from splitfl.he.params import PRESETS, HEError

    secret = create_secret_context(PRESETS["default"])
    head = torch.nn.Linear(16, 3)
    server = SplitServer(head, torch.optim.SGD(head.parameters(), lr=0.1), None, "he", public_context_bytes(secret), 8)
    assert not server.has_secret_key()
    he = PackedLinearHE(16, 3, 8, server.he.slots)
    good = he.encrypt_activations(secret, torch.randn(8, 16)).to_bytes()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF
    for bad in (bytes(tampered), good[: len(good) // 2], b"not a ciphertext"):
        with pytest.raises(HEError):
            server.forward(bad)
    wrong_shape = PackedLinearHE(15, 3, 8, server.he.slots).encrypt_activations(secret, torch.randn(8, 15)).to_bytes()
    with pytest.raises(HEError, match="(?i)dim|shape|15"):
        server.forward(wrong_shape)  # activations that do not fit the head
    with pytest.raises(ProtocolError, match="layer 3 does not exist"):
        server.forward(good, layer=3)
    other = create_secret_context(PRESETS["default"])  # another consortium's key
    with pytest.raises(HEError, match="(?i)context|fingerprint|key"):
        server.forward(PackedLinearHE(16, 3, 8, server.he.slots).encrypt_activations(other, torch.randn(8, 16)).to_bytes())
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    server.forward(good)  # still serving


def test_split_he_linear_probe_caches_embeddings_and_sends_no_gradients(tmp_path):
    """Frozen encoder (linear probe): embeddings computed once per hospital; only the head update travels back."""
    cfg = tiny_config(regime="split-he")
    cfg.train.epochs = 2
    cfg.model.freeze_encoder = True
    cfg.split.transcript = True
    cfg.split.transcript_max_steps = 1
    from splitfl.models import build_split_model

    torch.manual_seed(cfg.seed)
    initial, _ = build_split_model(cfg.model, 2, 1, cfg.data.size)
    metrics = run(cfg, tmp_path)
    trained, before = _weights(tmp_path), initial.state_dict()
    enc_keys = [k for k in trained if k.startswith("encoder.")]
    head_keys = [k for k in trained if k.startswith("head.")]
    assert enc_keys and all(torch.equal(trained[k], before[k]) for k in enc_keys)
    assert head_keys and any(not torch.equal(trained[k], before[k]) for k in head_keys)
    kinds = [json.loads(l)["kind"] for l in (tmp_path / "transcript" / "index.jsonl").read_text().splitlines()]
    assert kinds == ["activations_in", "logits_out", "head_update_in"]
    assert metrics["protocol"]["encoder_trainable"] is False


@pytest.mark.parametrize("activation", ["relu", "square"])
def test_mlp_head_split_he_matches_plain_matches_centralized(tmp_path, activation):
    """cut: mlp. Both affine layers run on ciphertexts; the hospital applies the activation between them."""
    results = {}
    for regime in ("centralized", "split-plain", "split-he"):
        cfg = one_step_config(regime)
        cfg.model.cut = "mlp"
        cfg.model.mlp_hidden = 16
        cfg.model.mlp_activation = activation
        cfg.split.transcript = regime == "split-he"
        results[regime] = run(cfg, tmp_path / regime)
    w = {r: _weights(tmp_path / r) for r in results}
    diff = lambda a, b: max((w[a][k].float() - w[b][k].float()).abs().max().item() for k in w[a])  # noqa: E731
    assert diff("centralized", "split-plain") < 1e-6
    assert 0 < diff("split-plain", "split-he") < HE_STEP_TOLERANCE
    kinds = [json.loads(l)["kind"] for l in (tmp_path / "split-he" / "transcript" / "index.jsonl").read_text().splitlines()
             if json.loads(l)["step"] == 0]
    assert kinds == [
        "layer0_activations_in", "layer0_logits_out", "layer1_activations_in", "layer1_logits_out",
        "layer1_logit_grads_in", "layer1_activation_grads_out", "layer0_logit_grads_in", "layer0_activation_grads_out",
        "head_update_in",
    ]


def test_noninteractive_mlp_inference_matches_interactive(tmp_path, monkeypatch):
    """Validation/test through the server's one-round polynomial MLP (deep preset) equals the layer-by-layer path."""
    calls = []
    real_predict = SplitServer.predict
    monkeypatch.setattr(SplitServer, "predict", lambda self, payload: calls.append(1) or real_predict(self, payload))
    results = {}
    for mode in ("interactive", "noninteractive"):
        cfg = one_step_config("split-he")
        cfg.data.n_val = cfg.data.n_test = 64
        cfg.model.cut = "mlp"
        cfg.model.mlp_hidden = 8
        cfg.model.mlp_activation = "square"
        cfg.split.he_preset = "deep"
        cfg.split.mlp_inference = mode
        results[mode] = run(cfg, tmp_path / mode)
    for split in ("val", "test"):
        a, b = results["interactive"][split], results["noninteractive"][split]
        assert b["auroc_macro"] == pytest.approx(a["auroc_macro"], abs=1e-3)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3)
    assert len(calls) == 2  # one chunk of 64 for validation after the epoch, one for the test split


def test_noninteractive_inference_refuses_relu_and_shallow_presets(tmp_path):
    from splitfl.he.params import HEError
    from splitfl.engine import RunError

    cfg = one_step_config("split-he")
    cfg.model.cut = "mlp"
    cfg.split.mlp_inference = "noninteractive"
    with pytest.raises(RunError, match="polynomial activation"):
        run(cfg, tmp_path / "relu")
    cfg.model.mlp_activation = "square"
    with pytest.raises(HEError):
        run(cfg, tmp_path / "shallow")  # the default preset has one level; the MLP needs three


def interrupt_in_second_epoch(cfg, out_dir, monkeypatch) -> None:
    """Run ``cfg`` into ``out_dir`` and press Ctrl-C as the split run's second epoch starts."""
    import splitfl.split.runner as runner_mod

    real_epoch, calls = runner_mod.SplitRunner.train_epoch, []

    def interrupted(self, epoch, desc):
        calls.append(epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, desc)

    with monkeypatch.context() as m:
        m.setattr(runner_mod.SplitRunner, "train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, out_dir)


def test_split_he_resumes_after_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C in epoch 2: the rerun reuses the consortium key file and continues from the checkpoint."""
    cfg = tiny_config(regime="split-he")
    cfg.split.dp_noise_multiplier, cfg.split.dp_max_grad_norm = 1.0, 1.0
    interrupt_in_second_epoch(cfg, tmp_path, monkeypatch)
    key = (tmp_path / "keys" / "consortium.secret").read_bytes()
    eps_after_one = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["history"][0]["epsilon"]
    metrics = run(cfg, tmp_path)
    assert (tmp_path / "keys" / "consortium.secret").read_bytes() == key
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert len(history) == 3  # header + epochs 1 and 2, epoch 1 not retrained
    assert metrics["privacy"]["epsilon"] > eps_after_one  # the accountant continued, not restarted
