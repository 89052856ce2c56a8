"""Foundation-model checkpoints in their released key layouts (tiny sizes, written into tmp_path).

Each file is built from a tiny timm ViT whose keys are renamed to the source
layout by explicit rules *here* (not by the converter under test); loading it
back must reproduce the source model's outputs exactly.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from splitfl.config import ModelConfig
from splitfl.models import ModelError, build_split_model, create_model, detect_format, load_pretrained

TINY = dict(embed_dim=32, depth=2, num_heads=2)
MAE_DROP = "MAE decoder / mask token, pretraining only, not part of the encoder"
HEAD = {"head.weight", "head.bias"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vit(name: str, num_classes: int = 0, img_size: int = 224, seed: int = 0, in_chans: int = 3, **kw) -> nn.Module:
    """A tiny timm ViT whose norms, LayerScale and embeddings are far from their init (so mistakes show)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes, in_chans, img_size=img_size, **{**TINY, **kw})
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma") or (("norm" in key) and key.endswith("weight")):
                p.uniform_(0.5, 1.5)
            elif key in ("cls_token", "pos_embed", "reg_token") or key.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model.eval()


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _x(size: int, chans: int = 3) -> torch.Tensor:
    return torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(1))


def _assert_clean(report, extra_missing: set[str] = HEAD) -> None:
    """No encoder key missing or unexpected (only the classifier the checkpoint never had may be missing)."""
    assert set(report.missing_keys) <= extra_missing, report.missing_keys
    assert report.unexpected_keys == [], report.unexpected_keys


# ---------------------------------------------------------------- RETFound (MAE)


def _mae_decoder(embed_dim: int, dec_dim: int = 16, depth: int = 2, patch: int = 16, tokens: int = 197) -> dict:
    """MAE's MaskedAutoencoderViT decoder entries, as in RETFound_cfp_weights.pth (tiny sizes)."""
    g = torch.Generator().manual_seed(7)
    sd = {
        "mask_token": torch.randn(1, 1, dec_dim, generator=g),
        "decoder_embed.weight": torch.randn(dec_dim, embed_dim, generator=g),
        "decoder_embed.bias": torch.randn(dec_dim, generator=g),
        "decoder_pos_embed": torch.randn(1, tokens, dec_dim, generator=g),
        "decoder_norm.weight": torch.ones(dec_dim),
        "decoder_norm.bias": torch.zeros(dec_dim),
        "decoder_pred.weight": torch.randn(patch * patch * 3, dec_dim, generator=g),
        "decoder_pred.bias": torch.zeros(patch * patch * 3),
    }
    shapes = {"norm1": (dec_dim,), "norm2": (dec_dim,), "attn.qkv": (3 * dec_dim, dec_dim),
              "attn.proj": (dec_dim, dec_dim), "mlp.fc1": (4 * dec_dim, dec_dim), "mlp.fc2": (dec_dim, 4 * dec_dim)}
    for i in range(depth):
        for mod, w in shapes.items():
            sd[f"decoder_blocks.{i}.{mod}.weight"] = torch.randn(*w, generator=g)
            sd[f"decoder_blocks.{i}.{mod}.bias"] = torch.randn(w[0], generator=g)
    return sd


@pytest.fixture(scope="module")
def retfound(tmp_path_factory) -> tuple[nn.Module, Path]:
    """MAE ViT-L/16 layout: encoder keys are timm's names, plus decoder and mask token, under 'model'."""
    src = _vit("vit_large_patch16_224", seed=1)
    encoder = dict(src.state_dict())  # MAE's encoder: cls_token, pos_embed (1, 197, D), patch_embed, blocks, norm
    assert encoder["pos_embed"].shape == (1, 197, 32) and not any(k.startswith("head") for k in encoder)
    path = tmp_path_factory.mktemp("retfound") / "RETFound_cfp_weights.pth"
    torch.save({"model": {**encoder, **_mae_decoder(32)}}, path)
    return src, path


def test_retfound(retfound):
    src, path = retfound
    model = _vit("vit_large_patch16_224", num_classes=2, seed=99)
    report = load_pretrained(model, str(path), fmt="retfound")
    assert report.format == "retfound" and not report.mapping.detected
    _assert_clean(report)
    assert set(report.missing_keys) == HEAD
    dropped = dict(report.dropped_keys)
    assert set(dropped) == {"mask_token"} | {k for k in _mae_decoder(32) if k.startswith("decoder_")}
    assert set(dropped.values()) == {MAE_DROP}
    assert report.renamed == [] and report.adapted_keys == []
    assert torch.equal(_features(model, _x(224)), _features(src, _x(224)))
    text = str(report)
    assert "(format: retfound)" in text and "renamed: none" in text
    assert f"dropped mask_token, decoder_" in text and f"(+{len(dropped) - 6} more): {MAE_DROP}" in text


def test_retfound_training_checkpoint_with_args(tmp_path: Path, retfound):
    """MAE's save_model also stores optimizer, epoch, scaler and an argparse Namespace: read safely."""
    src, _ = retfound
    path = tmp_path / "checkpoint-399.pth"
    weights = {**src.state_dict(), **_mae_decoder(32)}
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(3))])
    torch.save({"model": weights, "optimizer": opt.state_dict(), "epoch": 399, "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75, input_size=224)}, path)
    model = _vit("vit_large_patch16_224", num_classes=2, seed=99)
    report = load_pretrained(model, str(path))  # auto
    assert report.format == "retfound" and report.mapping.detected
    assert "(format: retfound, detected from keys)" in str(report)
    assert torch.equal(_features(model, _x(224)), _features(src, _x(224)))


class _Unpicklable:  # stands for any object in a checkpoint that weights_only refuses
    def __init__(self) -> None:
        self.value = 1


def test_checkpoint_with_arbitrary_objects_says_how_to_extract(tmp_path: Path, retfound):
    src, _ = retfound
    path = tmp_path / "trusted_training_ckpt.pth"
    torch.save({"model": src.state_dict(), "args": _Unpicklable()}, path)
    with pytest.raises(ModelError, match=r"(?s)Could not read checkpoint .*trusted_training_ckpt.*weights_only=False\)"
                                         r".*torch\.save\(ck\['model'\]"):
        load_pretrained(_vit("vit_large_patch16_224"), str(path), fmt="retfound")


def test_retfound_at_medmnist_size_resamples_embeddings(retfound):
    """28 px grey images, patch 4: pos_embed 14x14 -> 7x7 and the patch kernel 16 -> 4, RGB -> grey; all reported."""
    src, path = retfound
    model = _vit("vit_large_patch16_224", num_classes=2, img_size=28, in_chans=1, patch_size=4)
    report = load_pretrained(model, str(path), fmt="retfound")
    _assert_clean(report)
    adapted = dict(report.adapted_keys)
    assert set(adapted) == {"pos_embed", "patch_embed.proj.weight"}
    assert "grid 14x14 -> 7x7" in adapted["pos_embed"] and "resample_abs_pos_embed" in adapted["pos_embed"]
    assert "(16, 16) -> (4, 4)" in adapted["patch_embed.proj.weight"] and "3 -> 1" in adapted["patch_embed.proj.weight"]
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[7, 7], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.isfinite(_features(model, _x(28, 1))).all()
    assert "adapted pos_embed: (1, 197, 32) -> (1, 50, 32)" in str(report)


def test_retfound_through_build_split_model(retfound):
    src, path = retfound
    cfg = ModelConfig(name="vit_large_patch16_224", pretrained=str(path), pretrained_format="retfound",
                      freeze_encoder=True, timm_kwargs=dict(TINY))
    split, report = build_split_model(cfg, num_classes=3, in_chans=3, img_size=224)
    assert report is not None and report.format == "retfound"
    assert torch.equal(split.encoder.body.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert all(not p.requires_grad for p in split.encoder_parameters())


# ---------------------------------------------------------------- UNI


@pytest.fixture(scope="module")
def uni(tmp_path_factory) -> tuple[nn.Module, Path]:
    """timm vit_large_patch16_224(init_values=1e-5, dynamic_img_size=True, num_classes=0), saved as is."""
    src = _vit("vit_large_patch16_224", seed=2, init_values=1e-5, dynamic_img_size=True)
    assert "blocks.1.ls2.gamma" in src.state_dict() and not any(k.startswith("head") for k in src.state_dict())
    path = tmp_path_factory.mktemp("uni") / "pytorch_model.bin"
    torch.save(src.state_dict(), path)
    return src, path


def test_uni(uni):
    src, path = uni
    model = _vit("vit_large_patch16_224", num_classes=2, seed=99, init_values=1e-5, dynamic_img_size=True)
    report = load_pretrained(model, str(path), fmt="uni", strict=True)  # strict: only the new head is missing
    assert report.format == "uni"
    _assert_clean(report)
    assert report.dropped_keys == [] and report.adapted_keys == [] and report.renamed == []
    assert torch.equal(model.blocks[1].ls2.gamma, src.blocks[1].ls2.gamma)
    assert torch.equal(_features(model, _x(224)), _features(src, _x(224)))
    assert load_pretrained(_vit("vit_large_patch16_224", init_values=1e-5), str(path)).format == "uni"  # auto


def test_uni_into_model_without_layer_scale(uni):
    _, path = uni
    model = _vit("vit_large_patch16_224", num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"(?s)has LayerScale weights \(blocks\.0\.ls1\.gamma.*without LayerScale"
                                         r".*model\.timm_kwargs: \{init_values: 1\.0e-5\}"):
        load_pretrained(model, str(path), fmt="uni")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched on error


def test_checkpoint_without_layer_scale_into_model_with_it(retfound):
    _, path = retfound
    with pytest.raises(ModelError, match=r"has LayerScale .* but checkpoint .* has none.*Remove init_values"):
        load_pretrained(_vit("vit_large_patch16_224", init_values=1e-5), str(path), fmt="retfound")


# ---------------------------------------------------------------- DINOv2


def _dinov2_file(src: nn.Module, path: Path, registers: bool = False, swiglu: bool = False) -> dict:
    """facebookresearch/dinov2 hub layout (dinov2_vits14_pretrain.pth) from a timm model, by explicit rules."""
    sd = dict(src.state_dict())
    out = {"mask_token": torch.zeros(1, src.embed_dim)}
    if registers:  # DINOv2: pos_embed covers [cls, patches]; registers sit after cls without a position
        class_pos = torch.randn(1, 1, sd["pos_embed"].shape[-1], generator=torch.Generator().manual_seed(3))
        out["cls_token"] = sd.pop("cls_token") - class_pos
        out["pos_embed"] = torch.cat([class_pos, sd.pop("pos_embed")], dim=1)
        out["register_tokens"] = sd.pop("reg_token")
    for k, v in sd.items():
        if swiglu:
            k = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", k))
        out[k] = v
    torch.save(out, path)
    return out


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> tuple[nn.Module, Path, dict]:
    src = _vit("vit_small_patch14_dinov2", seed=3, img_size=518)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    sd = _dinov2_file(src, path)
    assert sd["pos_embed"].shape == (1, 1370, 32) and sd["mask_token"].shape == (1, 32)
    return src, path, sd


def test_dinov2(dinov2):
    src, path, _ = dinov2
    model = _vit("vit_small_patch14_dinov2", num_classes=2, seed=99, img_size=518)
    report = load_pretrained(model, str(path), fmt="dinov2")
    _assert_clean(report)
    assert [k for k, _ in report.dropped_keys] == ["mask_token"] and "DINOv2 mask token" in report.dropped_keys[0][1]
    assert report.renamed == [] and report.adapted_keys == []
    assert torch.equal(_features(model, _x(518)), _features(src, _x(518)))


def test_dinov2_at_224_matches_timm_filter(dinov2):
    """Resampled to another image size: the result equals timm's own checkpoint_filter_fn conversion."""
    _, path, sd = dinov2
    model = _vit("vit_small_patch14_dinov2", num_classes=2, img_size=224)
    report = load_pretrained(model, str(path))  # auto
    assert report.format == "dinov2"
    _assert_clean(report)
    assert "grid 37x37 -> 16x16" in dict(report.adapted_keys)["pos_embed"]
    reference = checkpoint_filter_fn(dict(sd), model)
    own = model.state_dict()
    for k, v in reference.items():
        assert torch.allclose(own[k], v, atol=1e-6), k


def test_dinov2_with_registers(tmp_path: Path):
    src = _vit("vit_small_patch14_reg4_dinov2", seed=4, img_size=518)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    sd = _dinov2_file(src, path, registers=True)
    assert sd["register_tokens"].shape == (1, 4, 32) and sd["pos_embed"].shape == (1, 1370, 32)
    model = _vit("vit_small_patch14_reg4_dinov2", num_classes=2, seed=99, img_size=518)
    report = load_pretrained(model, str(path), fmt="dinov2")
    _assert_clean(report)
    renamed = dict((dst, s) for s, dst in report.renamed)
    assert renamed["reg_token"] == "register_tokens"
    assert renamed["cls_token"].startswith("cls_token + pos_embed")
    assert torch.allclose(_features(model, _x(518)), _features(src, _x(518)), atol=1e-5)
    for k, v in checkpoint_filter_fn(dict(sd), model).items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    with pytest.raises(ModelError, match=r"has 4 register tokens but model 'vit_small_patch14_dinov2' has 0.*"
                                         r"vit_small_patch14_reg4_dinov2"):
        load_pretrained(_vit("vit_small_patch14_dinov2", img_size=518), str(path), fmt="dinov2")


def test_dinov2_giant_swiglu(tmp_path: Path):
    src = _vit("vit_giant_patch14_dinov2", seed=5, img_size=56)
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    sd = _dinov2_file(src, path, swiglu=True)
    assert "blocks.0.mlp.w12.weight" in sd and "blocks.1.mlp.w3.bias" in sd
    model = _vit("vit_giant_patch14_dinov2", num_classes=2, seed=99, img_size=56)
    report = load_pretrained(model, str(path), fmt="dinov2")
    _assert_clean(report)
    assert ("blocks.0.mlp.w12.weight", "blocks.0.mlp.fc1.weight") in report.renamed
    assert torch.equal(_features(model, _x(56)), _features(src, _x(56)))


# ---------------------------------------------------------------- Phikon (HuggingFace ViTModel)


def _hf_vit(src: nn.Module, prefix: str = "") -> dict:
    """transformers ViTModel layout (owkin/phikon) from a timm ViT: explicit renames, qkv split into q, k, v."""
    sd = src.state_dict()
    d = sd["cls_token"].shape[-1]
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
        "pooler.dense.weight": torch.randn(d, d, generator=torch.Generator().manual_seed(8)),
        "pooler.dense.bias": torch.zeros(d),
    }
    for i in range(len(src.blocks)):
        b, layer = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{layer}attention.attention.query.{kind}"] = q.clone()
            out[f"{layer}attention.attention.key.{kind}"] = k.clone()
            out[f"{layer}attention.attention.value.{kind}"] = v.clone()
            out[f"{layer}attention.output.dense.{kind}"] = sd[f"{b}attn.proj.{kind}"]
            out[f"{layer}intermediate.dense.{kind}"] = sd[f"{b}mlp.fc1.{kind}"]
            out[f"{layer}output.dense.{kind}"] = sd[f"{b}mlp.fc2.{kind}"]
            out[f"{layer}layernorm_before.{kind}"] = sd[f"{b}norm1.{kind}"]
            out[f"{layer}layernorm_after.{kind}"] = sd[f"{b}norm2.{kind}"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def phikon(tmp_path_factory) -> tuple[nn.Module, Path, dict]:
    src = _vit("vit_base_patch16_224", seed=6)
    sd = _hf_vit(src)
    path = tmp_path_factory.mktemp("phikon") / "model.safetensors"
    safetensors.torch.save_file(sd, str(path))
    return src, path, sd


def _hf_self_attention(sd: dict, layer: int, heads: int, h: torch.Tensor) -> torch.Tensor:
    """transformers ViTSelfAttention + ViTSelfOutput, written out from the query/key/value weights."""
    p = f"encoder.layer.{layer}.attention."
    b, n, d = h.shape

    def proj(name: str) -> torch.Tensor:
        y = h @ sd[f"{p}attention.{name}.weight"].T + sd[f"{p}attention.{name}.bias"]
        return y.view(b, n, heads, d // heads).transpose(1, 2)

    q, k, v = proj("query"), proj("key"), proj("value")
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    context = (probs @ v).transpose(1, 2).reshape(b, n, d)
    return context @ sd[f"{p}output.dense.weight"].T + sd[f"{p}output.dense.bias"]


def test_phikon(phikon):
    src, path, sd = phikon
    model = _vit("vit_base_patch16_224", num_classes=2, seed=99)
    report = load_pretrained(model, str(path), fmt="phikon")
    _assert_clean(report)
    assert {k for k, _ in report.dropped_keys} == {"pooler.dense.weight", "pooler.dense.bias"}
    assert "pooler" in report.dropped_keys[0][1]
    renamed = {dst: s for s, dst in report.renamed}
    assert renamed["pos_embed"] == "embeddings.position_embeddings"
    assert renamed["blocks.1.attn.qkv.weight"] == (
        "encoder.layer.1.attention.attention.query.weight + encoder.layer.1.attention.attention.key.weight + "
        "encoder.layer.1.attention.attention.value.weight (concatenated q, k, v)")
    assert len(report.renamed) == len(model.state_dict()) - len(HEAD)
    assert torch.equal(_features(model, _x(224)), _features(src, _x(224)))
    h = torch.randn(2, 197, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model.blocks[0].attn(h), _hf_self_attention(sd, 0, heads=2, h=h), atol=1e-5)
    text = str(report)
    assert f"renamed {len(report.renamed)} keys to timm names: " in text and "embeddings.cls_token -> cls_token" in text


def test_phikon_image_classification_bin_with_vit_prefix(tmp_path: Path, phikon):
    """ViTForImageClassification pytorch_model.bin: 'vit.' prefix, classifier -> timm head."""
    src, _, _ = phikon
    sd = _hf_vit(src, prefix="vit.")
    del sd["vit.pooler.dense.weight"], sd["vit.pooler.dense.bias"]
    sd["classifier.weight"], sd["classifier.bias"] = torch.randn(5, 32), torch.randn(5)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    model = _vit("vit_base_patch16_224", num_classes=5, seed=99)
    report = load_pretrained(model, str(path))  # auto
    assert report.format == "phikon"
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert torch.equal(model.head.weight, sd["classifier.weight"])
    assert torch.equal(_features(model, _x(224)), _features(src, _x(224)))


def test_phikon_incomplete_attention(tmp_path: Path, phikon):
    _, _, sd = phikon
    sd = {k: v for k, v in sd.items() if k != "encoder.layer.1.attention.attention.key.weight"}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(sd, str(path))
    with pytest.raises(ModelError, match=r"encoder\.layer\.1\.attention\.attention has no key weight"):
        load_pretrained(_vit("vit_base_patch16_224"), str(path), fmt="phikon")


# ---------------------------------------------------------------- detection and wrong formats


def test_detect_format(retfound, uni, dinov2, phikon):
    assert detect_format(set(torch.load(retfound[1])["model"])) == "retfound"
    assert detect_format(set(torch.load(uni[1]))) == "uni"
    assert detect_format(set(dinov2[2])) == "dinov2"
    assert detect_format(set(phikon[2])) == "phikon"
    assert detect_format(set(_vit("vit_tiny_patch16_224", num_classes=10).state_dict())) == "timm"
    assert detect_format(set(create_model("resnet18", 10, 3).state_dict())) == "timm"


@pytest.mark.parametrize("fixture, named, right", [
    ("dinov2", "retfound", "dinov2"),
    ("retfound", "dinov2", "retfound"),
    ("phikon", "uni", "phikon"),
    ("uni", "dinov2", "uni"),
    ("retfound", "phikon", "retfound"),
])
def test_wrong_format_names_the_right_one(request, fixture, named, right):
    path = request.getfixturevalue(fixture)[1]
    pattern = (rf"(?s)not in the '{named}' layout \(model\.pretrained_format: {named}\)\. Expected .*; found \d+ keys: "
               rf".*The keys match the '{right}' layout: set model\.pretrained_format: {right}")
    with pytest.raises(ModelError, match=pattern):
        load_pretrained(_vit("vit_large_patch16_224"), str(path), fmt=named)


def test_wrong_format_message_shows_real_keys(dinov2):
    with pytest.raises(ModelError) as err:
        load_pretrained(_vit("vit_small_patch14_dinov2", img_size=518), str(dinov2[1]), fmt="retfound")
    assert re.search(r"found 35 keys: mask_token, blocks\.0\.ls1\.gamma, .*cls_token, pos_embed, ", str(err.value))


def test_plain_timm_vit_named_as_foundation_format(tmp_path: Path):
    path = tmp_path / "vit_in1k.pth"
    torch.save(_vit("vit_tiny_patch16_224", num_classes=10).state_dict(), path)
    with pytest.raises(ModelError, match=r"timm ViT without LayerScale .*: set model\.pretrained_format: timm or retfound"):
        load_pretrained(_vit("vit_tiny_patch16_224"), str(path), fmt="dinov2")
    other = tmp_path / "resnet.pth"
    torch.save(create_model("resnet18", 10, 3).state_dict(), other)
    expected = r"not in the 'uni' layout.*found 122 keys: conv1\.weight, bn1\.weight, .*No foundation layout"
    with pytest.raises(ModelError, match=expected):
        load_pretrained(_vit("vit_tiny_patch16_224"), str(other), fmt="uni")


def test_foundation_format_into_a_cnn(retfound):
    with pytest.raises(ModelError, match=r"'resnet18' is a ResNet, not a timm VisionTransformer\. "
                                         r"Set model\.name: vit_large_patch16_224"):
        load_pretrained(create_model("resnet18", 2, 3), str(retfound[1]), fmt="retfound")


def test_hf_dinov2_is_not_phikon(tmp_path: Path):
    path = tmp_path / "phikon_v2.safetensors"
    safetensors.torch.save_file({"embeddings.mask_token": torch.zeros(1, 8),
                                 "encoder.layer.0.layer_scale1.lambda1": torch.ones(8),
                                 "encoder.layer.0.attention.attention.query.weight": torch.zeros(8, 8)}, str(path))
    with pytest.raises(ModelError, match="HuggingFace Dinov2Model keys"):
        load_pretrained(_vit("vit_base_patch16_224"), str(path), fmt="phikon")


def test_truncated_and_unknown_format(tmp_path: Path, retfound):
    broken = tmp_path / "RETFound_cfp_weights.pth"
    broken.write_bytes(retfound[1].read_bytes()[:4000])
    with pytest.raises(ModelError, match=r"Could not read checkpoint .*RETFound_cfp_weights"):
        load_pretrained(_vit("vit_large_patch16_224"), str(broken), fmt="retfound")
    with pytest.raises(ModelError, match=r"pretrained_format: 'mae' is not one of auto, timm, retfound"):
        load_pretrained(_vit("vit_large_patch16_224"), str(retfound[1]), fmt="mae")
