"""Split learning end to end: split-plain matches centralized; the server's view is recorded; bad messages bounce."""
from __future__ import annotations

import json

import pytest
import torch
from test_train import tiny_config

from splitfl.split.server import SplitServer
from splitfl.split.tensors import ProtocolError, tensor_to_bytes
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
