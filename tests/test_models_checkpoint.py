"""Loading local foundation-model checkpoints (written by timm models into tmp_path, never downloaded)."""
from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn

from splitfl.config import ModelConfig
from splitfl.models import LoadReport, ModelError, build_split_model, create_model, load_pretrained

IMG = 28


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """The 'foundation model': an RGB, 1000-class, small-stem ResNet-18 with non-trivial BN stats."""
    torch.manual_seed(123)
    model = create_model("resnet18", 1000, 3, small_input_stem=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _target(num_classes: int = 1000, in_chans: int = 3, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes, in_chans, small_input_stem=kw.pop("small", True), **kw).eval()


def _assert_same_except(model: nn.Module, source: nn.Module, skip: set[str] = frozenset()) -> None:
    src = source.state_dict()
    for k, v in model.state_dict().items():
        if k not in skip:
            assert torch.equal(v, src[k]), k


def _x(chans: int = 3) -> torch.Tensor:
    return torch.randn(2, chans, IMG, IMG, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- formats and nesting


def test_plain_state_dict(tmp_path: Path, source):
    path = tmp_path / "plain.pth"
    torch.save(source.state_dict(), path)
    model = _target()
    report = load_pretrained(model, str(path), strict=True)
    assert isinstance(report, LoadReport)
    assert not (report.missing_keys or report.unexpected_keys or report.dropped_keys or report.adapted_keys)
    assert len(report.loaded_keys) == len(source.state_dict())
    with torch.no_grad():
        assert torch.equal(model(_x()), source(_x()))


def test_nested_state_dict_with_ddp_prefix(tmp_path: Path, source):
    path = tmp_path / "nested.pt"
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 7, "arch": "resnet18"}, path)
    model = _target()
    load_pretrained(model, str(path), strict=True)
    _assert_same_except(model, source)


def test_lightning_style_model_prefix_and_ema_preference(tmp_path: Path, source):
    path = tmp_path / "lightning.ckpt"
    sd = {f"model.{k}": v for k, v in source.state_dict().items()}
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"state_dict": decoy, "state_dict_ema": sd}, path)
    model = _target()
    load_pretrained(model, str(path), strict=True)
    _assert_same_except(model, source)  # the EMA weights, not the zeros


def test_safetensors(tmp_path: Path, source):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = _target()
    report = load_pretrained(model, str(path))
    assert not report.missing_keys
    _assert_same_except(model, source)


# ---------------------------------------------------------------- fine-tuning adaptations


def test_different_num_classes_drops_classifier(tmp_path: Path, source):
    path = tmp_path / "in1k.pth"
    torch.save(source.state_dict(), path)
    model = _target(num_classes=2)
    fc_before = model.fc.weight.clone()
    report = load_pretrained(model, str(path), strict=True)
    assert sorted(k for k, _ in report.dropped_keys) == ["fc.bias", "fc.weight"]
    assert "num_classes" in dict(report.dropped_keys)["fc.weight"]
    assert not report.missing_keys  # dropped keys are reported as dropped, not missing
    assert torch.equal(model.fc.weight, fc_before)
    _assert_same_except(model, source, skip={"fc.weight", "fc.bias"})
    text = str(report)
    assert "dropped fc.weight" in text and "(1000, 512)" in text and "(2, 512)" in text


def test_rgb_checkpoint_into_grey_model(tmp_path: Path, source):
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    model = _target(in_chans=1)
    report = load_pretrained(model, str(path))
    assert [k for k, _ in report.adapted_keys] == ["conv1.weight"]
    assert "3 -> 1" in str(report)
    assert torch.equal(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    _assert_same_except(model, source, skip={"conv1.weight"})
    grey = _x(1)
    with torch.no_grad():  # a grey image behaves like the same image on all three RGB channels
        assert torch.allclose(model(grey), source(grey.expand(-1, 3, -1, -1)), atol=1e-4)


def test_imagenet_stem_into_small_input_stem_is_dropped(tmp_path: Path):
    torch.manual_seed(5)
    imagenet = create_model("resnet18", 1000, 3)  # 7x7 stride-2 conv1
    path = tmp_path / "imagenet_stem.pth"
    torch.save(imagenet.state_dict(), path)
    model = _target(in_chans=1)  # 3x3 small-input stem
    report = load_pretrained(model, str(path))
    assert dict(report.dropped_keys).keys() == {"conv1.weight"}
    assert torch.equal(model.layer1[0].conv1.weight, imagenet.layer1[0].conv1.weight)


def test_vit_checkpoint_at_other_resolution_and_channels(tmp_path: Path):
    """timm's ViT converter resamples patch and position embeddings; RGB is summed to grey."""
    torch.manual_seed(0)
    src = create_model("vit_tiny_patch16_224", 10, 3, img_size=64)  # 4x4 grid of 16 px patches
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    model = create_model("vit_tiny_patch16_224", 2, 1, img_size=IMG, small_input_stem=True)  # 7x7 grid, 4 px
    report = load_pretrained(model, str(path))
    assert not report.missing_keys and not report.unexpected_keys
    assert {k for k, _ in report.dropped_keys} == {"head.weight", "head.bias"}
    assert [k for k, _ in report.adapted_keys] == ["patch_embed.proj.weight"]
    assert model.pos_embed.shape == (1, 50, 192)
    assert torch.equal(model.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(_x(1))).all()


# ---------------------------------------------------------------- errors


def test_wrong_architecture_names_key_and_shapes(tmp_path: Path):
    torch.manual_seed(0)
    path = tmp_path / "r50.pth"
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), path)
    with pytest.raises(ModelError, match=r"does not fit model 'resnet18'.*layer1\.0\.conv1\.weight: "
                                         r"checkpoint \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\).*right model name"):
        load_pretrained(_target(), str(path))


def test_other_family_checkpoint_is_rejected(tmp_path: Path):
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto", pretrained=False).state_dict(), path)
    model = _target()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"122 of the model's 122 keys are missing.*Did you pick the right model name"):
        load_pretrained(model, str(path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched on error


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file(tmp_path: Path, source, suffix):
    path = tmp_path / f"broken{suffix}"
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), good)
    else:
        safetensors.torch.save_file(dict(source.state_dict()), str(good))
    path.write_bytes(good.read_bytes()[: 2000])  # truncated download
    with pytest.raises(ModelError, match=r"Could not read checkpoint .*broken"):
        load_pretrained(_target(), str(path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelError, match="junk.pt"):
        load_pretrained(_target(), str(junk))


def test_missing_file_and_bad_extension(tmp_path: Path):
    with pytest.raises(ModelError, match=r"not found: .*nope\.pth.*never downloaded"):
        load_pretrained(_target(), str(tmp_path / "nope.pth"))
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported extension"):
        load_pretrained(_target(), str(other))


def test_not_a_state_dict(tmp_path: Path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ModelError, match="list.pt"):
        load_pretrained(_target(), str(path))
    path = tmp_path / "mixed.pt"
    torch.save({"conv1.weight": torch.zeros(3), "epoch": 3}, path)
    with pytest.raises(ModelError, match=r"not a state dict.*'epoch'"):
        load_pretrained(_target(), str(path))


def test_strict_rejects_partial_checkpoints(tmp_path: Path, source):
    sd = dict(source.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["layer4.1.bn2.bias"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    model = _target()
    report = load_pretrained(model, str(path))
    assert report.unexpected_keys == ["extra.weight"] and report.missing_keys == ["layer4.1.bn2.bias"]
    expected = r"(?s)strict loading .* failed.*missing: layer4\.1\.bn2\.bias.*unexpected: extra\.weight"
    with pytest.raises(ModelError, match=expected):
        load_pretrained(_target(), str(path), strict=True)


def test_split_model_is_refused(tmp_path: Path, source):
    from splitfl.models import split_model

    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(ModelError, match="before"):
        load_pretrained(split_model(_target()), str(path))


# ---------------------------------------------------------------- end to end


def test_build_split_model_loads_before_split(tmp_path: Path, source):
    path = tmp_path / "foundation.safetensors"
    safetensors.torch.save_file(dict(source.state_dict()), str(path))
    cfg = ModelConfig(name="resnet18", pretrained=str(path), cut="mlp", freeze_encoder=True, mlp_activation="poly2",
                      small_input_stem=True)
    split, report = build_split_model(cfg, num_classes=2, in_chans=1, img_size=IMG)
    assert report is not None and [k for k, _ in report.adapted_keys] == ["conv1.weight"]
    assert {k for k, _ in report.dropped_keys} == {"fc.weight", "fc.bias"}
    body = split.encoder.body
    assert torch.equal(body.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    assert all(not p.requires_grad for p in split.encoder_parameters())
    with torch.no_grad():
        grey = _x(1)
        feats = source.forward_head(source.forward_features(grey.expand(-1, 3, -1, -1)), pre_logits=True)
        assert torch.allclose(split.encoder(grey), feats, atol=1e-4)
