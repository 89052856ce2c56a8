"""split-plain with a stage cut (``model.cut: stage:N``): the server runs the rest of the network on spatial activations.

The split is a re-factoring of backprop: with one hospital it trains exactly what centralized training trains.
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from test_split import interrupt_in_second_epoch
from test_train import tiny_config

from splitfl.models import create_model, split_model
from splitfl.split.server import SplitServer
from splitfl.tensors import ProtocolError, tensor_from_bytes, tensor_to_bytes
from splitfl.engine import RunError
from splitfl.train import run

CUT = "stage:1"


def stage_config(regime: str, epochs: int = 2):
    """One hospital (the centralized data order), 64 images in batches of 32: two SGD steps per epoch."""
    cfg = tiny_config(regime=regime)
    cfg.model.cut = CUT
    cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 64, 48, 48
    cfg.data.partition.num_sites = 1
    cfg.train.batch_size = 32
    cfg.train.epochs = epochs
    # Adam's first steps divide by |g|, and a large step makes this tiny ResNet's trajectory chaotic: either would
    # amplify float re-association noise (~1e-7 after one step) beyond the 1e-5 the comparison allows.
    cfg.train.optimizer = "sgd"
    cfg.train.lr = 0.02
    return cfg


def _final_weights(folder) -> dict[str, torch.Tensor]:
    """The model after the last epoch, from checkpoint.pt (centralized: one model; split: encoder + server head)."""
    state = torch.load(folder / "checkpoint.pt", weights_only=False)["runner"]
    if "model" in state:
        return state["model"]
    return {**{f"encoder.{k}": v for k, v in state["encoder"].items()},
            **{f"head.{k}": v for k, v in state["server"]["head"].items()}}


def _losses(folder) -> list[float]:
    return [float(r["train_loss"]) for r in csv.DictReader((folder / "history.csv").open())]


def _worst(w1: dict[str, torch.Tensor], w2: dict[str, torch.Tensor]) -> float:
    assert w1.keys() == w2.keys()
    return max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Centralized and split-plain, both cut at stage:1, trained without interruption."""
    root = tmp_path_factory.mktemp("stage")
    return {regime: (run(stage_config(regime), root / regime), root / regime) for regime in ("centralized", "split-plain")}


def test_stage_cut_split_plain_equals_centralized(straight):
    (central, c_dir), (split, s_dir) = straight["centralized"], straight["split-plain"]
    w1, w2 = _final_weights(c_dir), _final_weights(s_dir)
    assert any(k.startswith("encoder.") for k in w1) and any(k.startswith("head.") for k in w1)
    assert _worst(w1, w2) < 1e-5  # four SGD steps (BatchNorm statistics included): only float re-association
    assert _losses(s_dir) == pytest.approx(_losses(c_dir), abs=1e-5)
    assert split["test"]["loss"] == pytest.approx(central["test"]["loss"], abs=1e-5)
    assert split["val"]["auroc_macro"] == pytest.approx(central["val"]["auroc_macro"], abs=1e-4)
    assert split["protocol"]["server_has_secret_key"] is False and split["protocol"]["encoder_trainable"] is True
    # the server received spatial float32 activations: at least C*H*W*4 bytes per sample
    model = create_model("resnet18", num_classes=2, in_chans=1, img_size=28)
    c, h, w = split_model(model, CUT, input_shape=(1, 28, 28)).feature_dim
    assert split["wire"]["bytes_per_sample_up"] > c * h * w * 4


def test_stage_cut_split_plain_resumes_after_an_interrupt(straight, tmp_path, monkeypatch):
    """Ctrl-C in epoch 2: the server head (and its optimizer) come back from the checkpoint; same result."""
    interrupt_in_second_epoch(stage_config("split-plain"), tmp_path, monkeypatch)
    assert len(_losses(tmp_path)) == 1
    run(stage_config("split-plain"), tmp_path)
    _, s_dir = straight["split-plain"]
    assert _losses(tmp_path) == _losses(s_dir)
    assert _worst(_final_weights(tmp_path), _final_weights(s_dir)) == 0.0


def test_stage_cut_transcript_records_spatial_activations(tmp_path):
    cfg = stage_config("split-plain", epochs=1)
    cfg.data.partition.num_sites = 2
    cfg.split.transcript = True
    cfg.split.transcript_max_steps = 1
    run(cfg, tmp_path)
    folder = tmp_path / "transcript"
    meta = json.loads((folder / "meta.json").read_text())
    feature_shape = tuple(meta["feature_shape"])
    assert meta["cut"] == CUT and len(feature_shape) == 3 and meta["in_features"] is None
    lines = [json.loads(l) for l in (folder / "index.jsonl").read_text().splitlines()]
    assert [l["kind"] for l in lines] == ["activations_in", "logits_out", "logit_grads_in", "activation_grads_out"]
    read = {l["kind"]: (folder / l["file"]).read_bytes() for l in lines}
    acts = tensor_from_bytes(read["activations_in"], "activations", (None, *feature_shape))
    assert acts.shape[0] == 32 and acts.shape[1:] == feature_shape  # what activation inversion works on
    assert tensor_from_bytes(read["activation_grads_out"], "grads", (32, *feature_shape)).abs().sum() > 0
    assert tensor_from_bytes(read["logits_out"], "logits", (32, 2)) is not None


def test_stage_cut_frozen_encoder_caches_embeddings(tmp_path):
    """Linear-probe style: the encoder (stem + stage 1) stays fixed, the server trains the remaining stages."""
    from splitfl.models import build_split_model

    cfg = stage_config("split-plain", epochs=1)
    cfg.model.freeze_encoder = True
    torch.manual_seed(cfg.seed)
    initial, _ = build_split_model(cfg.model, 2, 1, cfg.data.size)
    metrics = run(cfg, tmp_path)
    trained, before = _final_weights(tmp_path), initial.state_dict()
    enc = [k for k in trained if k.startswith("encoder.")]
    head = [k for k in trained if k.startswith("head.") and trained[k].is_floating_point()]
    assert enc and all(torch.equal(trained[k], before[k]) for k in enc)
    assert head and any(not torch.equal(trained[k], before[k]) for k in head)
    assert metrics["protocol"]["encoder_trainable"] is False
    assert math.isfinite(metrics["test"]["loss"])


# ----------------------------------------------------------------------------- the server at the boundary


def _stage_server() -> tuple[SplitServer, tuple[int, ...]]:
    model = create_model("resnet18", num_classes=3, in_chans=1, img_size=28)
    split = split_model(model, CUT, input_shape=(1, 28, 28))
    head = split.head
    server = SplitServer(head, torch.optim.SGD(head.parameters(), lr=0.1), None, "plain",
                         feature_shape=split.feature_dim, num_classes=3)
    return server, tuple(split.feature_dim)


def test_stage_server_rejects_bad_activations_and_keeps_state():
    server, shape = _stage_server()
    c, h, w = shape
    before = {k: v.clone() for k, v in server.head.state_dict().items()}  # BatchNorm statistics included
    bad = [
        (tensor_to_bytes(torch.zeros(4, c, h + 1, w)), rf"expected shape \(None, {c}, {h}, {w}\), got \(4, {c}, {h + 1}, {w}\)"),
        (tensor_to_bytes(torch.zeros(4, c + 1, h, w)), "expected shape"),
        (tensor_to_bytes(torch.zeros(4, c * h * w)), rf"expected a 4-d tensor of shape \(None, {c}, {h}, {w}\), got 2-d"),
        (tensor_to_bytes(torch.zeros(4, c, h, w))[:-3], "truncated"),
        (tensor_to_bytes(torch.full((4, c, h, w), float("inf"))), "infinite"),
        (b"garbage-bytes", "not a splitfl tensor"),
    ]
    for payload, match in bad:
        with pytest.raises(ProtocolError, match=match):
            server.forward(payload)
        with pytest.raises(ProtocolError, match="without a preceding training forward"):
            server.backward(tensor_to_bytes(torch.zeros(4, 3)))
    assert all(torch.equal(before[k], v) for k, v in server.head.state_dict().items())
    logits = tensor_from_bytes(server.forward(tensor_to_bytes(torch.randn(4, *shape))), "logits", (4, 3))  # still serves
    with pytest.raises(ProtocolError, match=r"expected shape \(4, 3\)"):
        server.backward(tensor_to_bytes(torch.zeros(4, 2)))  # a logit gradient that does not fit the logits
    grads = tensor_from_bytes(server.backward(tensor_to_bytes(torch.ones_like(logits))), "grads", (4, *shape))
    assert grads.abs().sum() > 0


def test_stage_server_step_equals_autograd_of_the_whole_model():
    """One training step through the byte-level server: head update and activation gradient = plain autograd."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, in_chans=1, img_size=28)
    split = split_model(model, CUT, input_shape=(1, 28, 28))
    reference = split_model(create_model("resnet18", num_classes=3, in_chans=1, img_size=28), CUT)
    reference.load_state_dict(split.state_dict())
    split.train()
    reference.train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 3, (8,))

    acts = reference.encoder(x)
    acts.retain_grad()
    torch.nn.functional.cross_entropy(reference.head(acts), y).backward()

    server = SplitServer(split.head, torch.optim.SGD(split.head.parameters(), lr=0.1), None, "plain",
                         feature_shape=split.feature_dim, num_classes=3)
    feats = split.encoder(x)
    logits = tensor_from_bytes(server.forward(tensor_to_bytes(feats)), "logits", (8, 3)).requires_grad_(True)
    torch.nn.functional.cross_entropy(logits, y).backward()
    head_before = {n: p.detach().clone() for n, p in split.head.named_parameters()}
    grad_feats = tensor_from_bytes(server.backward(tensor_to_bytes(logits.grad)), "grads", (8, *split.feature_dim))
    assert torch.allclose(grad_feats, acts.grad, atol=1e-6)
    for (name, p), (_, q) in zip(split.head.named_parameters(), reference.head.named_parameters()):
        # the server took one SGD step: its weights moved by lr * (autograd's gradient of the whole model)
        assert torch.allclose(head_before[name] - p.detach(), 0.1 * q.grad, atol=1e-6), name
    feats.backward(grad_feats)
    for (name, p), (_, q) in zip(split.encoder.named_parameters(), reference.encoder.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_server_needs_shapes_for_a_non_linear_head_and_refuses_it_in_he_mode():
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    with pytest.raises(ProtocolError, match="feature_shape and num_classes"):
        SplitServer(head, opt, None, "plain")
    with pytest.raises(ProtocolError, match="split-plain only"):
        SplitServer(head, opt, None, "he", b"context")
    lin = torch.nn.Linear(8, 3)
    with pytest.raises(ProtocolError, match="linear head takes"):
        SplitServer(lin, torch.optim.SGD(lin.parameters(), lr=0.1), None, "plain", feature_shape=(9,))


# ----------------------------------------------------------------------------- refused combinations


def test_split_he_refuses_a_stage_cut(tmp_path):
    cfg = stage_config("split-he", epochs=1)
    with pytest.raises(RunError, match=r"model.cut='stage:1'.*split-plain only"):
        run(cfg, tmp_path)


def test_split_plain_stage_cut_refuses_dp_noise(tmp_path):
    cfg = stage_config("split-plain", epochs=1)
    cfg.split.dp_noise_multiplier = 1.0
    cfg.split.dp_max_grad_norm = 1.0
    with pytest.raises(RunError, match="split-he head updates"):
        run(cfg, tmp_path)


def test_grpc_split_service_refuses_a_stage_cut(tmp_path):
    from splitfl.net.split.hospital import run_split_site
    from splitfl.net.split.server import run_split_server

    cfg = stage_config("split-plain", epochs=1)
    with pytest.raises(RunError, match="gRPC split service"):
        run_split_server(cfg, tmp_path / "server", "127.0.0.1:0", None, True)
    with pytest.raises(RunError, match="gRPC split service"):
        run_split_site(cfg, 0, "127.0.0.1:1", None, True, tmp_path / "site")
