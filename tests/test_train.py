"""Training runs end to end on tiny data: artefacts, resume, local regime, CLI and ``fabric run``."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import interrupt_on_call
from splitfl.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, TrainConfig
import splitfl.central.runner as central_runner
from splitfl.engine import CHECKPOINT, RunError
from splitfl.train import run

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> RunConfig:
    cfg = RunConfig(
        regime="centralized",
        seed=3,
        data=DataConfig(source="synthetic", modality="xray", n_train=192, n_val=96, n_test=96, size=28,
                        partition=PartitionConfig(scheme="iid", num_sites=2)),
        model=ModelConfig(name="resnet18"),
        train=TrainConfig(epochs=2, batch_size=32, lr=1e-3, progress=False, accelerator="cpu"),
    )
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, value) if name else setattr(cfg, section, value)
    return cfg


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_centralized_writes_all_artefacts(tmp_path):
    metrics = run(tiny_config(), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"]["auroc_macro"] == pytest.approx(metrics["test"]["auroc_macro"])
    assert 0.0 <= saved["test"]["auroc_macro"] <= 1.0
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "sensitivity", "specificity", "auroc_per_class"):
        assert key in saved["test"], key
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for name in (CHECKPOINT, "best_model.pt", "learning_curves.png", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name
    best = torch.load(tmp_path / "best_model.pt", weights_only=False)
    assert list(best["task"]["label_names"]) == ["normal", "pneumonia"]


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    straight = run(tiny_config(), tmp_path / "straight")
    interrupt_on_call(monkeypatch, central_runner, "train_one_epoch")  # Ctrl-C during the second epoch
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(), tmp_path / "resumed")
    monkeypatch.undo()
    resumed = run(tiny_config(), tmp_path / "resumed")
    h1 = list(csv.DictReader((tmp_path / "straight" / "history.csv").open()))
    h2 = list(csv.DictReader((tmp_path / "resumed" / "history.csv").open()))
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    assert resumed["test"]["auroc_macro"] == straight["test"]["auroc_macro"]


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny_config()
    cfg.train.epochs = 1
    run(cfg, tmp_path)
    other = tiny_config()
    other.train.epochs = 1
    other.train.lr = 0.1
    with pytest.raises(RunError, match=r"different configuration \(train.lr: 0.001 -> 0.1\)"):
        run(other, tmp_path)


def test_local_regime_reports_each_site(tmp_path):
    cfg = tiny_config(regime="local")
    cfg.train.epochs = 1
    metrics = run(cfg, tmp_path)
    assert set(metrics["sites"]) == {"site_0", "site_1"}
    site_aucs = [s["test"]["auroc_macro"] for s in metrics["sites"].values()]
    assert metrics["test"]["auroc_macro"] == pytest.approx(sum(site_aucs) / 2)
    assert sum(s["n_train"] for s in metrics["sites"].values()) == 192
    for site in ("site_0", "site_1"):
        assert (tmp_path / "sites" / site / "metrics.json").exists()


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "splitfl.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_rejects_unknown_config_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    proc = _cli(["train", "--config", str(bad), "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode != 0
    assert "epoch" in proc.stderr


def test_cli_reports_missing_data_file_clearly(tmp_path):
    proc = _cli(["train", "--config", "configs/xray/centralized.yaml", "--data.root", str(tmp_path),
                 "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2
    assert "pneumoniamnist.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reports_unknown_model_clearly(tmp_path):
    proc = _cli(["train", "--config", "configs/quickstart.yaml", "--model.name", "resnet181",
                 "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2
    assert "resnet18" in proc.stderr and "Traceback" not in proc.stderr


def test_data_summary_prints_site_counts(tmp_path):
    proc = _cli(["data", "summary", "--config", "configs/quickstart.yaml", "--data.partition.scheme", "dirichlet",
                 "--data.partition.num_sites", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "normal" in proc.stdout and "pneumonia" in proc.stdout
    assert "dirichlet" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["centralized", "split-he"])
def test_fabric_run_launcher(tmp_path, regime):
    """The same script under Lightning's launcher (``fabric run``), as an ML engineer would start it."""
    fabric = Path(sys.executable).with_name("fabric")
    if not fabric.exists():
        pytest.skip("fabric launcher not installed next to this python")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"regime: {regime}\n"
        "data: {source: synthetic, n_train: 96, n_val: 64, n_test: 64}\n"
        "train: {epochs: 1, batch_size: 32, progress: false}\n"
    )
    # Run the console script through this interpreter: a cached venv that was moved
    # (as .ci/run does) keeps a stale shebang in its scripts.
    proc = subprocess.run(
        [sys.executable, str(fabric), "run", "--accelerator", "cpu", "splitfl/train.py", "--config", str(cfg), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["test"]["auroc_macro"] is not None


@pytest.mark.realdata
def test_real_pneumoniamnist_learns(tmp_path, medmnist_dir):
    if not (medmnist_dir / "pneumoniamnist.npz").exists():
        pytest.skip("pneumoniamnist.npz not present")
    cfg = tiny_config()
    cfg.data = DataConfig(source="medmnist", flag="pneumoniamnist", root=str(medmnist_dir), max_train=2048)
    cfg.train.epochs = 2
    cfg.train.batch_size = 64
    metrics = run(cfg, tmp_path)
    assert metrics["data"]["train"] == 2048 and metrics["data"]["test"] == 624  # official test split
    assert metrics["test"]["auroc_macro"] > 0.85


def test_resume_accepts_a_checkpoint_saved_before_a_config_key_existed(tmp_path):
    """A checkpoint whose resume key lacks a key added later (at its default) resumes; a changed value does not."""
    cfg = tiny_config(**{"train.epochs": 1})
    run(cfg, tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del state["resume_key"]["fed"]["local_steps"]  # as written by an older splitfl
    torch.save(state, tmp_path / "checkpoint.pt")
    cfg.train.epochs = 2
    with pytest.raises(RunError, match="train.epochs: 1 -> 2"):
        run(cfg, tmp_path)
    cfg.train.epochs = 1
    run(cfg, tmp_path)  # nothing left to train, and no complaint about fed.local_steps
