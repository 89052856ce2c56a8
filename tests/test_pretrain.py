"""Self-supervised pretraining (splitfl pretrain): masking, losses, sources without labels, encoder.pt, resume, CLI.

Everything runs on 16 px synthetic images with a 2-block, 32-wide ViT or a ResNet-18 and batches of 8.
"""
from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from conftest import interrupt_on_call
from splitfl.cli import main as cli_main
from splitfl.config import ModelConfig
from splitfl.models import build_split_model
from splitfl.pretrain import runner as runner_mod
from splitfl.pretrain.augment import simclr_view
from splitfl.pretrain.config import (
    MAEConfig,
    PretrainConfig,
    PretrainError,
    PretrainModelConfig,
    PretrainTrainConfig,
    SimCLRConfig,
    SourceConfig,
    validate,
)
from splitfl.pretrain.mae import MAE, patchify, random_masking, unpatchify
from splitfl.pretrain.outputs import ENCODER, classifier_keys
from splitfl.pretrain.runner import CHECKPOINT, build_encoder, build_method, make_optimizer, run
from splitfl.pretrain.simclr import nt_xent
from splitfl.pretrain.sources import load_images, load_source

TINY_VIT = PretrainModelConfig(
    name="vit_tiny_patch16_224", timm_kwargs={"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
)
RESNET = PretrainModelConfig(name="resnet18", small_input_stem=False)


@pytest.fixture(autouse=True)
def _threads():
    """One thread: on a shared 2-core machine two OpenMP threads spin on each other and run several times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_config(method: str = "mae", **train: object) -> PretrainConfig:
    return PretrainConfig(
        method=method,
        seed=1,
        img_size=16,
        channels=3,
        model=TINY_VIT if method == "mae" else RESNET,
        sources=[SourceConfig(kind="synthetic", modality="fundus", n=24, size=16),
                 SourceConfig(kind="synthetic", modality="xray", n=8, size=16)],
        train=PretrainTrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0.5,
                                     "progress": False, "accelerator": "cpu", **train}),
        mae=MAEConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2),
        simclr=SimCLRConfig(proj_hidden=32, proj_dim=16),
    )


def tiny_vit(**kwargs: object) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, **kwargs)


# ----------------------------------------------------------------------------- MAE


def test_masking_keeps_exactly_the_ratio_per_image():
    g = torch.Generator().manual_seed(0)
    m = random_masking(5, 16, 0.75, g)
    assert m.mask.shape == (5, 16)
    assert m.mask.sum(dim=1).tolist() == [12.0] * 5  # 75 % of 16 patches, in every image
    assert m.ids_keep.shape == (5, 4)
    for row, keep in zip(m.mask, m.ids_keep):  # the kept ids are exactly the unmasked patches
        assert sorted(keep.tolist()) == torch.nonzero(row == 0).flatten().tolist()
    assert len({tuple(sorted(k.tolist())) for k in m.ids_keep}) > 1  # masks differ between images


def test_mae_loss_counts_masked_patches_only():
    mae = MAE(tiny_vit(), MAEConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=False), 3)
    images = torch.randn(2, 3, 16, 16)
    mask = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0)).mask
    target = patchify(images, 4)
    pred = torch.where(mask.bool()[..., None], target, torch.full_like(target, 100.0))  # wrong on visible only
    assert mae.loss(images, pred, mask).item() == pytest.approx(0.0, abs=1e-10)
    pred = torch.where(mask.bool()[..., None], target + 1.0, target)  # off by 1 on masked only
    assert mae.loss(images, pred, mask).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(unpatchify(target, 4, 3, (4, 4)), images)


@pytest.mark.parametrize("layout", [
    {},  # class token, position embedding over [cls, patches]
    {"no_embed_class": True, "reg_tokens": 2},  # positions on patches only, then prefix tokens concatenated
    {"class_token": False, "global_pool": "avg"},  # no prefix tokens
])
def test_mae_encoder_runs_the_vit_on_visible_tokens(layout):
    """Keeping every patch in a shuffled order reproduces forward_features (up to that order) for each token layout."""
    vit = tiny_vit(**layout).eval()
    mae = MAE(vit, MAEConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2), 3).eval()
    images = torch.randn(3, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])
    with torch.no_grad():
        full = vit.forward_features(images)
        part = mae.encode(images, order)
    n = vit.num_prefix_tokens
    torch.testing.assert_close(part[:, :n], full[:, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part[:, n:], torch.gather(full[:, n:], 1, order[..., None].expand(-1, -1, 32)),
                               rtol=1e-5, atol=1e-5)
    visible = mae.encode(images, order[:, :4])
    assert visible.shape == (3, n + 4, 32)


def _fit_fixed_batch(method: torch.nn.Module, cfg: PretrainConfig, images: torch.Tensor, steps: int) -> list[float]:
    opt = make_optimizer(method, cfg.train)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = method(images, torch.Generator().manual_seed(0))  # same masks / views every step
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mae_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_config("mae")
    method = build_method(cfg, build_encoder(cfg))
    images, _ = load_images(cfg)
    losses = _fit_fixed_batch(method, cfg, images._x[:8], 25)
    assert losses[-1] < 0.6 * losses[0], losses


def test_simclr_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_config("simclr")
    method = build_method(cfg, build_encoder(cfg))
    images, _ = load_images(cfg)
    losses = _fit_fixed_batch(method, cfg, images._x[:8], 15)
    assert losses[-1] < 0.6 * losses[0], losses


def test_nt_xent_prefers_matching_views():
    z = torch.randn(6, 8)
    assert nt_xent(z, z, 0.2) < nt_xent(z, torch.randn(6, 8), 0.2)


def test_simclr_views_are_seeded_per_image_and_keep_the_range():
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    a = simclr_view(images, SimCLRConfig(), torch.Generator().manual_seed(3))
    b = simclr_view(images, SimCLRConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    same = images[:1].expand(6, -1, -1, -1)  # one image six times: six different views
    views = simclr_view(same, SimCLRConfig(), torch.Generator().manual_seed(4))
    assert len({round(v.sum().item(), 4) for v in views}) == 6
    grey = simclr_view(images[:, :1], SimCLRConfig(), torch.Generator().manual_seed(3))
    assert grey.shape == (6, 1, 16, 16)


def test_method_that_does_not_fit_the_architecture_is_refused():
    cfg = tiny_config("mae")
    cfg.model = RESNET
    with pytest.raises(PretrainError, match="needs a timm VisionTransformer"):
        build_method(cfg, build_encoder(cfg))


# ----------------------------------------------------------------------------- sources


def _write_npz_with_unreadable_labels(path: Path, n: int) -> np.ndarray:
    """A pneumoniamnist-shaped archive whose label members are garbage: reading one would fail."""
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s in ("train", "val", "test")}
    with zipfile.ZipFile(path, "w") as zf:
        for split, arr in images.items():
            with zf.open(f"{split}_images.npy", "w") as fh:
                np.lib.format.write_array(fh, arr)
            zf.writestr(f"{split}_labels.npy", b"\x93NUMPY\x01\x00\x20\x00{broken header: labels unreadable}\n")
    return images["train"]


def test_sources_never_read_labels(tmp_path):
    train = _write_npz_with_unreadable_labels(tmp_path / "pneumoniamnist.npz", 6)
    with pytest.raises(Exception):  # the labels really are unreadable
        np.load(tmp_path / "pneumoniamnist.npz")["train_labels"]
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((20, 24, 3), 40, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "manifest.csv").write_text("path,label,split\na.png,???,train\nb.png,,train\nc.png,-5,val\n")
    cfg = PretrainConfig(img_size=16, channels=3, sources=[
        SourceConfig(kind="medmnist", flag="pneumoniamnist", root=str(tmp_path), md5_check="off"),
        SourceConfig(kind="folder", path=str(tmp_path / "manifest.csv")),
        SourceConfig(kind="folder", path=str(tmp_path / "manifest.csv"), splits=["train", "val"]),
    ])
    data, info = load_images(cfg)
    assert [s["n_images"] for s in info] == [6, 2, 3]
    item = data[0]
    assert isinstance(item, torch.Tensor) and item.shape == (3, 16, 16)  # an image, and nothing else
    assert data.images.shape == (11, 16, 16, 3)
    grey = Image.fromarray(train[0]).convert("RGB").resize((16, 16), Image.BILINEAR)
    assert np.array_equal(data.images[0], np.asarray(grey))  # grey repeated to 3 channels, resized
    assert item.min() >= -1 and item.max() <= 1


def test_folder_of_images_and_grey_conversion(tmp_path):
    (tmp_path / "sub").mkdir()
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "sub" / "red.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_source(SourceConfig(kind="folder", path=str(tmp_path)), 0, 16, 1)
    assert loaded.images.shape == (2, 16, 16, 1)
    assert 70 < loaded.images[1].mean() < 84  # red to grey by ITU-R 601 luma (0.299 * 255 = 76)


@pytest.mark.parametrize("src", [
    SourceConfig(kind="medmnist", flag="pneumoniamnist", splits=["train", "test"]),
    SourceConfig(kind="synthetic", splits=["test"]),
    SourceConfig(kind="folder", path="images.csv", splits=["test"]),
])
def test_test_split_is_refused(src):
    cfg = PretrainConfig(sources=[src])
    with pytest.raises(PretrainError, match="test split .* must not be used for pretraining"):
        validate(cfg)
    with pytest.raises(PretrainError, match="test split must not be used"):
        load_source(src, 0, 16, 3)


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("method", ["mae", "simclr"])
def test_encoder_loads_downstream_with_no_missing_or_unexpected_keys(tmp_path, method):
    cfg = tiny_config(method, epochs=1, warmup_epochs=0)
    summary = run(cfg, tmp_path)
    saved = torch.load(tmp_path / ENCODER, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    downstream = ModelConfig(name=cfg.model.name, timm_kwargs=cfg.model.timm_kwargs,
                             small_input_stem=cfg.model.small_input_stem, pretrained=str(tmp_path / ENCODER))
    for in_chans in (3, 1):  # same channels, and grey images (first conv adapted, as for ImageNet weights)
        split, report = build_split_model(downstream, num_classes=2, in_chans=in_chans, img_size=16)
        assert report.unexpected_keys == []
        model = split.encoder.body
        classifier = {"head.weight", "head.bias"} if method == "mae" else {"fc.weight", "fc.bias"}
        assert set(report.missing_keys) == classifier
        assert set(report.missing_keys) == classifier_keys(timm.create_model(cfg.model.name, num_classes=2))
        assert report.dropped_keys == []
        own = {k: v for k, v in model.state_dict().items()}
        for key, value in saved.items():
            if in_chans == 3 or key not in dict(report.adapted_keys):
                assert torch.equal(own[key], value), key
    assert summary["encoder"]["tensors"] == len(saved)
    info = json.loads((tmp_path / "pretrain.json").read_text())
    assert [s["n_images"] for s in info["sources"]] == [24, 8] and info["n_images"] == 32
    assert info["sources"][0]["splits"] == ["train"]
    assert info["final_loss"] == pytest.approx(summary["final_loss"])
    for name in (CHECKPOINT, "history.csv", "loss_curve.png", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = run(tiny_config("mae", epochs=3), tmp_path / "straight")
    interrupt_on_call(monkeypatch, runner_mod, "train_one_epoch")  # Ctrl-C during the second epoch
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config("mae", epochs=3), tmp_path / "resumed")
    assert len(list(csv.DictReader((tmp_path / "resumed" / "history.csv").open()))) == 1
    monkeypatch.undo()
    resumed = run(tiny_config("mae", epochs=3), tmp_path / "resumed")
    h1 = list(csv.DictReader((tmp_path / "straight" / "history.csv").open()))
    h2 = list(csv.DictReader((tmp_path / "resumed" / "history.csv").open()))
    assert [(r["loss"], r["lr"]) for r in h1] == [(r["loss"], r["lr"]) for r in h2]
    assert resumed["final_loss"] == straight["final_loss"]
    a = torch.load(tmp_path / "straight" / ENCODER, weights_only=True)
    b = torch.load(tmp_path / "resumed" / ENCODER, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(PretrainError, match=r"different configuration \(train.lr: 0.001 -> 0.002\)"):
        run(tiny_config("mae", epochs=3, lr=2e-3), tmp_path / "resumed")


def test_cli_runs_end_to_end_on_synthetic_data(tmp_path, capsys):
    config = {
        "method": "simclr",
        "img_size": 16,
        "model": {"name": "resnet18", "small_input_stem": False},
        "sources": [{"kind": "synthetic", "modality": "histology", "n": 16}],
        "simclr": {"proj_hidden": 32, "proj_dim": 16},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "progress": False, "accelerator": "cpu"},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(["pretrain", "--config", str(path), "--out", str(tmp_path / "out"), "--seed", "2"])
    out = tmp_path / "out"
    info = json.loads((out / "pretrain.json").read_text())
    assert info["config"]["seed"] == 2 and info["n_images"] == 16
    assert yaml.safe_load((out / "config.yaml").read_text())["sources"][0]["modality"] == "histology"
    assert (out / ENCODER).is_file()

    config["sources"][0]["splits"] = ["test"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        cli_main(["pretrain", "--config", str(path), "--out", str(tmp_path / "other")])
    assert exc.value.code == 2
    assert "must not be used for pretraining" in capsys.readouterr().err
