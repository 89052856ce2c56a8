"""Model creation, HE-friendly heads and the encoder/head split (real timm models, tiny inputs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from splitfl.config import ModelConfig
from splitfl.models import (
    LinearHead,
    MLPHead,
    ModelError,
    PolyActivation,
    SplitModel,
    build_split_model,
    create_model,
    heads,
    split_model,
    valid_cuts,
)

IMG, CHANS, CLASSES = 28, 1, 3
FAMILIES = ["resnet18", "convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224"]
N_STAGES = {"resnet18": 4, "convnext_atto": 4, "efficientnet_b0": 7, "vit_tiny_patch16_224": 12}
# Variants whose optional layers are real modules (not Identity), so a decomposition that
# skipped them would fail: the ImageNet ResNet stem (max-pool), ConvNeXt with norm_pre, a ViT
# with pre-norm, register tokens, average pooling and fc_norm.
VARIANTS = {
    "resnet18": ("resnet18", 32, dict(small_input_stem=False)),
    "resnet18-small": ("resnet18", IMG, {}),
    "convnext_atto-small": ("convnext_atto", IMG, {}),
    "convnext_atto-norm_pre": ("convnext_atto", IMG, dict(head_norm_first=True)),
    "efficientnet_b0-small": ("efficientnet_b0", IMG, {}),
    "vit_tiny-small": ("vit_tiny_patch16_224", IMG, {}),
    "vit_tiny-prenorm-reg-avg": (
        "vit_tiny_patch16_224", IMG, dict(pre_norm=True, reg_tokens=2, global_pool="avg", fc_norm=True)
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny CPU forwards are fastest (and not oversubscribed) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make(name: str, seed: int = 0, img_size: int = IMG, **kw) -> nn.Module:
    torch.manual_seed(seed)
    kw.setdefault("small_input_stem", True)
    return create_model(name, CLASSES, CHANS, img_size=img_size, **kw)


def _randomize_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics, so eval-mode outputs depend on every buffer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, CHANS, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(VARIANTS))
def family(request) -> tuple[str, nn.Module, torch.Tensor]:
    """(timm name, eval-mode model with random BN statistics, matching input batch)."""
    name, size, kw = VARIANTS[request.param]
    model = _make(name, img_size=size, **kw).eval()
    with torch.no_grad():
        _randomize_bn(model)
    return name, model, torch.randn(2, CHANS, size, size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- factory


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelError, match=r"Unknown model name 'resnet19'.*resnet18"):
        create_model("resnet19", 2, 1)


def test_bad_arguments_are_model_errors():
    with pytest.raises(ModelError, match="in_chans"):
        create_model("resnet18", 2, 0)
    with pytest.raises(ModelError, match="rejected its arguments"):
        create_model("resnet18", 2, 1, not_an_arg=3)
    with pytest.raises(ModelError, match="multiple of patch_size=16"):
        create_model("vit_tiny_patch16_224", 2, 1, img_size=28)


def test_small_input_stem_per_family():
    r = _make("resnet18")
    assert (r.conv1.kernel_size, r.conv1.stride, r.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert r.conv1.bias is None and r.conv1.in_channels == CHANS and isinstance(r.maxpool, nn.Identity)
    assert r.pretrained_cfg["architecture"] == "resnet18" and r.pretrained_cfg["first_conv"] == "conv1"
    e = _make("efficientnet_b0")
    assert e.conv_stem.stride == (1, 1)
    c = _make("convnext_atto")
    assert c.stem[0].stride == (2, 2) and c.stem[0].kernel_size == (2, 2)
    v = _make("vit_tiny_patch16_224")
    assert v.patch_embed.grid_size == (7, 7) and v.num_classes == CLASSES
    # an explicit patch size wins over the small-input default
    v8 = create_model("vit_tiny_patch16_224", 2, 1, img_size=32, small_input_stem=True, patch_size=8)
    assert v8.patch_embed.grid_size == (4, 4)


def test_small_input_stem_keeps_resolution():
    x = torch.randn(2, 1, IMG, IMG)
    plain = create_model("resnet18", 2, 1).eval()
    small = _make("resnet18").eval()
    with torch.no_grad():
        assert plain.forward_features(x).shape[-1] == 1  # 28 px / 32
        assert small.forward_features(x).shape[-1] == 4  # 28 px / 8, as MedMNIST's ResNet-18 (28)


# ---------------------------------------------------------------- heads


def test_poly_activations():
    x = torch.linspace(-4, 4, 801)
    sq = heads.make_activation("square")
    assert isinstance(sq, PolyActivation) and sq.coeffs == (0.0, 0.0, 1.0)
    assert torch.equal(sq(x), x * x)
    p2 = heads.make_activation("poly2")
    assert p2.coeffs == (0.25, 0.5, 0.125) and p2.degree == 2
    assert torch.allclose(p2(x), 0.125 * x**2 + 0.5 * x + 0.25, atol=1e-6)
    assert (p2(x) - torch.relu(x)).abs().max() <= 0.25 + 1e-6  # minimax error on [-4, 4]
    assert not list(p2.parameters())  # fixed coefficients, never trained
    with pytest.raises(ModelError, match="relu"):
        heads.make_activation("tanh")


def test_heads_expose_linear_layers():
    mlp = MLPHead(16, 8, 3, "poly2")
    fc1, fc2 = mlp.linear_layers()
    assert (fc1.in_features, fc1.out_features, fc2.out_features) == (16, 8, 3)
    z = torch.randn(4, 16)
    assert torch.equal(mlp(z), fc2(mlp.act(fc1(z))))
    lin = nn.Linear(16, 3)
    head = LinearHead.from_linear(lin)
    assert head.linear_layers() == [lin] and head.linear.weight is lin.weight
    assert LinearHead(16, 3)(z).shape == (4, 3)


# ---------------------------------------------------------------- split: exactness


def test_pooled_cut_reproduces_model_exactly(family):
    name, model, x = family
    split = split_model(model, "pooled")
    with torch.no_grad():
        assert torch.equal(split.eval()(x), model(x))
    assert split.feature_dim == (model.num_features,)
    assert isinstance(split.head, LinearHead) and split.head.linear is model.get_classifier()


def test_every_stage_cut_reproduces_model_exactly(family):
    name, model, x = family
    cuts = [c for c in valid_cuts(model) if c.startswith("stage:")]
    assert len(cuts) == N_STAGES[name] + 1
    with torch.no_grad():
        ref = model(x)
        for cut in cuts:
            split = split_model(model, cut, input_shape=tuple(x.shape[1:])).eval()
            z = split.encoder(x)
            assert tuple(z.shape[1:]) == split.feature_dim
            assert torch.equal(split.head(z), ref), f"{name} {cut}"


def test_mlp_cut(family):
    name, model, x = family
    split = split_model(model, "mlp", mlp_hidden=16, mlp_activation="square").eval()
    assert isinstance(split.head, MLPHead) and isinstance(split.head.act, PolyActivation)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(split.encoder(x), feats)
        assert split(x).shape == (2, CLASSES)
    assert model.get_classifier().weight not in set(split.parameters())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cut", ["pooled", "stage:1"])
def test_train_mode_matches_model_with_same_rng(name, cut, x):
    """Dropout, drop-path and batch-statistics BN run in the same order, so the same RNG gives the same output."""
    model = _make(name, drop_rate=0.5, drop_path_rate=0.2).train()
    split = split_model(model, cut).train()
    torch.manual_seed(7)
    ref = model(x)
    torch.manual_seed(7)
    out = split(x)
    assert torch.equal(out, ref)
    torch.manual_seed(8)
    assert not torch.equal(split(x), ref)  # dropout is really active


# ---------------------------------------------------------------- split: sharing, state, freezing


@pytest.mark.parametrize("cut", ["pooled", "stage:2"])
def test_halves_share_and_partition_the_model_parameters(family, cut):
    _, model, _ = family
    split = split_model(model, cut)
    enc = {id(p) for p in split.encoder_parameters()}
    head = {id(p) for p in split.head_parameters()}
    assert enc and head and not enc & head
    assert enc | head == {id(p) for p in model.parameters()}  # same tensors, nothing copied or lost
    enc_bufs = {id(b) for b in split.encoder.buffers()}
    assert enc_bufs | {id(b) for b in split.head.buffers()} == {id(b) for b in model.buffers()}


def test_split_leaves_model_usable(x):
    model = _make("resnet18").eval()
    with torch.no_grad():
        before = model(x)
        split_model(model, "mlp")
        split_model(model, "stage:1")
        assert torch.equal(model(x), before)
        assert isinstance(model.fc, nn.Linear)


@pytest.mark.parametrize(
    "name,cut", [("resnet18", "stage:2"), ("vit_tiny_patch16_224", "stage:5"), ("convnext_atto", "mlp")]
)
def test_state_dict_round_trip(name, cut, x):
    a = split_model(_make(name, seed=0), cut, mlp_activation="poly2")
    with torch.no_grad():
        _randomize_bn(a)
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = split_model(_make(name, seed=1), cut, mlp_activation="poly2")
    with torch.no_grad():
        assert not torch.equal(a.eval()(x), b.eval()(x))
        b.load_state_dict(a.state_dict(), strict=True)
        assert torch.equal(a(x), b(x))


def test_freeze_encoder_keeps_batchnorm_fixed(x):
    split = split_model(_make("resnet18"), "stage:2")
    split.freeze_encoder()
    split.train()
    assert not split.encoder.training and split.head.training
    assert all(not p.requires_grad for p in split.encoder_parameters())
    assert all(p.requires_grad for p in split.head_parameters())
    bn = split.encoder.stem[1]
    stats = bn.running_mean.clone()
    split(x).sum().backward()
    assert torch.equal(bn.running_mean, stats)  # no drift of a frozen encoder
    assert all(p.grad is not None for p in split.head_parameters())
    split.unfreeze_encoder()
    assert split.encoder.training and all(p.requires_grad for p in split.encoder_parameters())
    split(x)
    assert not torch.equal(bn.running_mean, stats)


def test_unfreeze_restores_deliberately_fixed_parameters():
    split = split_model(_make("vit_tiny_patch16_224"), "stage:1")
    pos = split.encoder.stem.vit.pos_embed
    pos.requires_grad_(False)  # e.g. a fixed (sin-cos) position embedding
    split.freeze_encoder()
    split.freeze_encoder()  # idempotent
    split.unfreeze_encoder()
    assert not pos.requires_grad
    assert split.encoder.stem.vit.patch_embed.proj.weight.requires_grad


# ---------------------------------------------------------------- split: errors and other families


def test_stage_out_of_range_lists_valid_cuts():
    model = _make("resnet18")
    with pytest.raises(ModelError, match=r"'stage:5' is out of range.*'stage:0'.*'stage:4'"):
        split_model(model, "stage:5")
    with pytest.raises(ModelError, match="out of range"):
        split_model(model, "stage:-1")


@pytest.mark.parametrize("cut", ["layer3", "stage:", "stage:two", "", "POOLED"])
def test_unknown_cut_lists_forms(cut):
    with pytest.raises(ModelError, match=r"'pooled', 'mlp', 'stage:N'"):
        split_model(_make("convnext_atto"), cut)


def test_family_without_adapter(x):
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", CLASSES, CHANS).eval()
    with pytest.raises(ModelError, match=r"no stage adapter.*MobileNetV3.*cut='pooled'"):
        split_model(model, "stage:1")
    assert valid_cuts(model) == ["pooled", "mlp"]
    with torch.no_grad():  # the generic pooled cut still works
        assert torch.equal(split_model(model).eval()(x), model(x))


def test_pooled_needs_a_linear_classifier():
    model = create_model("resnet18", 0, 1)
    with pytest.raises(ModelError, match="num_classes >= 1"):
        split_model(model, "pooled")
    with pytest.raises(ModelError, match="num_classes=0"):
        split_model(model, "mlp")
    with pytest.raises(ModelError, match="mlp_activation"):
        split_model(_make("resnet18"), "mlp", mlp_activation="sigmoid")


def test_build_split_model_from_config(x):
    cfg = ModelConfig(name="efficientnet_b0", cut="stage:3", freeze_encoder=True, drop_rate=0.1,
                      small_input_stem=True)
    split, report = build_split_model(cfg, num_classes=CLASSES, in_chans=CHANS, img_size=IMG)
    assert isinstance(split, SplitModel) and report is None
    assert split.cut == "stage:3" and split.feature_dim == (40, 7, 7) and split.encoder_frozen
    assert split.head.top.drop_rate == 0.1
    assert split.eval()(x).shape == (2, CLASSES)
