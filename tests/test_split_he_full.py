"""The split-he-full regime end to end: encrypted head trained on ciphertexts, equal to split-plain's SGD.

One hospital and SGD without momentum: split-plain and split-he-full compute the same steps, so their
released models agree to the CKKS tolerance; the server's view holds only ciphertexts; refreshes are
counted; a run resumes from its checkpoint with the encrypted head; bad configurations are refused.
"""
from __future__ import annotations

import json

import pytest
from test_split import _weights, interrupt_in_second_epoch
from test_train import tiny_config

from splitfl.engine import RunError

from splitfl.train import run

FULL_TOLERANCE = 1e-5  # weights after the run's steps; the head alone is tested to 1e-6 per step


def full_config(regime: str, epochs: int = 2, trainable: bool = True):
    """One hospital, 64 images in batches of 16 (4 steps per epoch), a small ResNet, plain SGD."""
    cfg = tiny_config(regime=regime)
    cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 64, 96, 96
    cfg.data.partition.num_sites = 1
    cfg.model.name, cfg.model.small_input_stem, cfg.model.freeze_encoder = "test_resnet", True, not trainable
    cfg.train.batch_size, cfg.train.epochs = 16, epochs
    cfg.train.optimizer, cfg.train.momentum, cfg.train.lr, cfg.train.scheduler = "sgd", 0.0, 0.05, "cosine"
    return cfg


@pytest.mark.parametrize("trainable", [True, False], ids=["fine-tuned encoder", "linear probe"])
def test_split_he_full_trains_what_split_plain_trains(tmp_path, trainable):
    plain = run(full_config("split-plain", trainable=trainable), tmp_path / "p")
    full = run(full_config("split-he-full", trainable=trainable), tmp_path / "f")
    w1, w2 = _weights(tmp_path / "p"), _weights(tmp_path / "f")
    assert w1.keys() == w2.keys()
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert 0 < worst < FULL_TOLERANCE, worst  # really encrypted, and the released head is the trained one
    # losses are continuous: they agree closely; AUROC of this barely trained model has near-ties CKKS noise can swap
    assert full["val"]["loss"] == pytest.approx(plain["val"]["loss"], abs=1e-4)
    assert full["test"]["loss"] == pytest.approx(plain["test"]["loss"], abs=1e-4)
    assert full["test"]["auroc_macro"] == pytest.approx(plain["test"]["auroc_macro"], abs=5e-3)
    proto = full["protocol"]
    assert proto["server_has_secret_key"] is False and proto["head_encrypted"] is True
    assert proto["head_updates"] == 8 and proto["he_preset"] == "full"


def test_server_view_is_ciphertexts_only_and_refreshes_are_counted(tmp_path):
    cfg = full_config("split-he-full", epochs=1)
    cfg.split.transcript, cfg.split.transcript_max_steps = True, 2
    cfg.split.full_refresh_every = 3
    metrics = run(cfg, tmp_path)
    assert metrics["protocol"]["head_refreshes"] == 1  # after update 3 of 4
    lines = [json.loads(l) for l in (tmp_path / "transcript" / "index.jsonl").read_text().splitlines()]
    assert [l["kind"] for l in lines] == ["weights_in"] + 2 * [
        "activations_in", "logits_out", "logit_grads_in", "activation_grads_out"]
    from splitfl.he.keys import engine_for, load_secret_context
    from splitfl.split.full_server import unpack_ciphertexts

    eng = engine_for(load_secret_context(tmp_path / "keys" / "consortium.secret"))
    for line in lines:  # every message is a list of real SEAL ciphertexts under the consortium's key
        data = (tmp_path / "transcript" / line["file"]).read_bytes()
        count = int.from_bytes(data[4:8], "little")
        for i, ct in enumerate(unpack_ciphertexts(data, count, line["kind"])):
            eng.load_ciphertext(ct, f"{line['kind']} #{i}")


def test_split_he_full_resumes_with_its_encrypted_head(tmp_path, monkeypatch):
    cfg = full_config("split-he-full", epochs=2)
    interrupt_in_second_epoch(cfg, tmp_path / "r", monkeypatch)
    resumed = run(cfg, tmp_path / "r")
    straight = run(cfg, tmp_path / "s")
    import csv

    rows = {name: list(csv.DictReader((tmp_path / name / "history.csv").open())) for name in ("r", "s")}
    assert [int(r["epoch"]) for r in rows["r"]] == [1, 2]  # epoch 1 from the checkpoint, not retrained
    for a, b in zip(rows["r"], rows["s"]):  # epoch 2 trained the restored encrypted head: same losses
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), abs=1e-4)
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-4)
    assert resumed["protocol"]["head_updates"] == straight["protocol"]["head_updates"] == 8


@pytest.mark.parametrize("change, match", [
    ({"train.optimizer": "adam"}, "plain SGD"),
    ({"train.momentum": 0.9}, "plain SGD"),
    ({"train.batch_size": 5000}, "slots"),  # more samples than a ciphertext's 4096 slots
    ({"train.batch_size": 24}, None),  # any batch that fits: nothing is rotated, no power of two needed
    ({"model.cut": "mlp"}, "encrypted linear head"),
    ({"split.dp_noise_multiplier": 1.0, "split.dp_max_grad_norm": 1.0}, "DP on the encrypted head"),
    ({"split.he_preset": "default"}, None),  # the default preset means "the full preset" here: accepted
])
def test_configurations_split_he_full_cannot_train_are_refused(tmp_path, change, match):
    cfg = full_config("split-he-full", epochs=1)
    cfg.data.n_train = 32
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    if match is None:
        run(cfg, tmp_path)
        return
    with pytest.raises(RunError, match=match):
        run(cfg, tmp_path)


def test_the_final_test_runs_through_the_best_epochs_head():
    """fit() loads best_model.pt before the test; the server's enc(W) must follow (re-encrypted by the key
    holders in process; the gRPC server restores the ciphertexts it exported then), not stay at the last epoch."""
    import torch

    from splitfl.he.encrypted_head import FullHeadHospital, FullHeadLayout, full_public_context_bytes
    from splitfl.he.keys import create_secret_context
    from splitfl.he.params import PRESETS
    from splitfl.split.full_server import FullSplitServer, pack_weight_rows
    from splitfl.split.transport import FullHETransport

    secret = create_secret_context(PRESETS["full"])
    layout = FullHeadLayout(6, 2, 4, PRESETS["full"].slots)
    w0, b0 = torch.randn(2, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    initial = pack_weight_rows(FullHeadHospital(secret, layout).encrypt_weights(w0, b0))
    server = FullSplitServer(full_public_context_bytes(secret, layout), 6, 2, 4, initial, refresh_every=3)
    transport = FullHETransport(server, secret)

    def step() -> None:
        transport.forward(torch.randn(4, 6))
        transport.backward(torch.randn(4, 2), lr=0.1, input_grad=False)
        transport.refresh_if_needed()

    step(), step()
    best_w, best_b = transport.release()  # "epoch 1": the best
    exported = server.export_weights()
    for _ in range(3):
        step()
    assert server.head.refreshes == 1 and (transport.release()[0] - best_w).abs().max() > 1e-3
    transport.restore(best_w, best_b)  # in process: the key holders encrypt the best head again
    w, b = transport.release()
    assert torch.allclose(w, best_w, atol=1e-9) and torch.allclose(b, best_b, atol=1e-9)
    assert server.head.refreshes == 1 and server.head.updates == 5  # a restore is not a refresh
    step()
    server.restore_weights(exported, fresh=False)  # the gRPC server: its own ciphertexts of then
    assert torch.allclose(transport.release()[0], best_w, atol=1e-9)
