"""interpret.attributions / interpret.targets on real timm models and real Captum (no mocks).

Kept small for CPU: 28-32 px images, 2-3 images, few IG steps where the
test is not about IG accuracy, and a 2-block ViT (same timm family and
patch-4 stem as ``vit_tiny_patch16_224`` at 32 px, 10 fewer blocks).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import splitfl.models  # noqa: F401  (registers splitfl_lenet with timm)
from interpret.attributions import METHODS, attribute, attribute_all, ig_completeness_gap
from interpret.targets import gradcam_layer, uses_smooth_nonlinearity
from splitfl.models.factory import create_model
from splitfl.models.heads import PolyActivation
from splitfl.models.split import split_model

# Per-model options that only make the shape tests cheaper.
FAST = {"integrated_gradients": {"n_steps": 8}, "occlusion": {"window": 7}, "smoothgrad": {"nt_samples": 4}}


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("test_resnet", num_classes=2, in_chans=1, img_size=28, small_input_stem=True).eval()


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("splitfl_lenet", 2, 1, img_size=28).eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", 2, 1, img_size=32, small_input_stem=True, depth=2).eval()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _logit(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, t[:, None]).squeeze(1)


# ---------------------------------------------------------------- every method, every model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["resnet", "lenet", "vit"])
def test_maps_shape_and_finite(name: str, method: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    size = 32 if name == "vit" else 28
    x = _images(2, size)
    maps = attribute(model, x, torch.tensor([0, 1]), method, **FAST.get(method, {}))
    assert maps.shape == (2, size, size)
    assert maps.dtype == torch.float32 and maps.device.type == "cpu"
    assert torch.isfinite(maps).all()
    if method != "gradcam":  # a random ReLU net's Grad-CAM may be ReLU'd to zero; see the reference tests
        assert maps.std() > 0


def test_attribute_all_and_progress(lenet: nn.Module) -> None:
    x = _images(3, 28)
    maps = attribute_all(lenet, x, 1, progress=True, batch_size=2, options=FAST)
    assert set(maps) == set(METHODS)
    assert all(m.shape == (3, 28, 28) for m in maps.values())


# ---------------------------------------------------------------- Integrated Gradients


@pytest.mark.parametrize("name", ["lenet", "resnet"])
@pytest.mark.parametrize("baseline", ["zero", "black"])
def test_ig_completeness_against_plain_torch(name: str, baseline: str, request: pytest.FixtureRequest) -> None:
    """Sum of IG attributions = f(x) - f(baseline) for the target logit, f evaluated in plain torch."""
    from captum.attr import IntegratedGradients

    model = request.getfixturevalue(name)
    x, t = _images(2, 28, seed=1), torch.tensor([1, 0])
    b = torch.zeros_like(x) if baseline == "zero" else torch.full_like(x, -1.0)
    maps = attribute(model, x, t, "integrated_gradients", baseline=baseline, n_steps=32, internal_batch_size=16)
    diff = _logit(model, x, t) - _logit(model, b, t)
    gap = maps.sum(dim=(1, 2)) - diff
    assert (gap.abs() <= 0.05 * diff.abs() + 1e-6).all(), (gap, diff)
    gap_fn = ig_completeness_gap(model, x, t, maps, baseline=baseline)
    torch.testing.assert_close(gap_fn, gap.double(), atol=1e-6, rtol=0)
    # and the maps are Captum's own attributions, channel-summed, with its convergence delta as small
    ref, delta = IntegratedGradients(model).attribute(x, b, target=t, n_steps=32, return_convergence_delta=True)
    torch.testing.assert_close(maps, ref.sum(1), rtol=1e-4, atol=1e-6)
    assert (delta.abs() <= 0.05 * diff.abs() + 1e-6).all()


@pytest.mark.parametrize("method,opts", [("integrated_gradients", {"n_steps": 8}), ("occlusion", {"window": 7})])
def test_batching_invariance_lenet(lenet: nn.Module, method: str, opts: dict) -> None:
    x, t = _images(4, 28, seed=2), torch.tensor([0, 1, 1, 0])
    one = attribute(lenet, x, t, method, batch_size=1, **opts)
    all_ = attribute(lenet, x, t, method, batch_size=4, **opts)
    torch.testing.assert_close(one, all_, rtol=1e-4, atol=1e-5)


def test_batching_invariance_batchnorm(resnet: nn.Module) -> None:
    """BatchNorm in eval mode: an image's map must not depend on the other images of its batch."""
    x, t = _images(3, 28, seed=3), torch.tensor([0, 1, 0])
    one = attribute(resnet, x, t, "integrated_gradients", batch_size=1, n_steps=8)
    all_ = attribute(resnet, x, t, "integrated_gradients", batch_size=3, n_steps=8)
    scale = all_.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(one, all_, rtol=1e-3, atol=1e-4 * scale)


def test_train_mode_restored_and_bn_stats_untouched(resnet: nn.Module) -> None:
    model = copy.deepcopy(resnet).train()
    model.layer1.eval()  # a deliberately mixed state must survive too
    before = {n: b.clone() for n, b in model.named_buffers()}
    attribute(model, _images(2, 28), 0, "smoothgrad", nt_samples=2)
    assert model.training and model.layer4.training and not model.layer1.training
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), f"{n} changed: attribution ran in train mode"


# ---------------------------------------------------------------- Grad-CAM


def _hand_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), store["a"])
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * store["a"].detach()).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def test_gradcam_cnn_matches_hand_computed(resnet: nn.Module, lenet: nn.Module) -> None:
    x = _images(3, 28, seed=4)
    layer, kind = gradcam_layer(resnet, x)
    assert kind == "cnn" and layer is resnet.layer4  # last 4-D output larger than 1x1 (4x4 here)
    assert gradcam_layer(lenet, x)[0] is lenet.body
    for model, layer in ((resnet, resnet.layer4), (lenet, lenet.body)):
        for t in (torch.tensor([0, 0, 0]), torch.tensor([1, 0, 1])):
            ref = _hand_gradcam(model, layer, x, t)
            got = attribute(model, x, t, "gradcam")
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
    assert _hand_gradcam(resnet, resnet.layer4, x, torch.tensor([0, 0, 0])).max() > 0  # the check is not 0 == 0


def test_gradcam_vit_token_grid(vit: nn.Module) -> None:
    x, t = _images(2, 32, seed=5), torch.tensor([1, 0])
    assert vit.num_prefix_tokens == 1 and vit.global_pool == "token"
    layer, kind = gradcam_layer(vit, x)
    assert kind == "vit" and layer is vit.blocks[-1].norm1
    # why norm1: with class-token pooling, patch tokens leaving the last block never reach the logits
    store = {}
    handle = vit.blocks[-1].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    logits = vit(x.clone().requires_grad_(True))
    handle.remove()
    (g,) = torch.autograd.grad(logits[:, 1].sum(), store["a"])
    assert g[:, 1:].abs().max() == 0 and g[:, 0].abs().max() > 0
    # reference: token Grad-CAM by hand on the 8x8 patch grid (32 px / patch 4)
    store.clear()
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    logits = vit(x.clone().requires_grad_(True))
    handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), store["a"])
    a, g = store["a"].detach()[:, 1:], g[:, 1:]
    cam = F.relu((a * g.mean(1, keepdim=True)).sum(-1)).reshape(2, 1, 8, 8)
    ref = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    got = attribute(vit, x, t, "gradcam")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
    assert got.std() > 0


def test_gradcam_vit_avg_pool_uses_block_output() -> None:
    torch.manual_seed(1)
    vit = create_model("vit_tiny_patch16_224", 2, 1, img_size=32, small_input_stem=True, depth=1, global_pool="avg")
    x = _images(2, 32)
    layer, kind = gradcam_layer(vit, x)
    assert kind == "vit" and layer is vit.blocks[-1]
    maps = attribute(vit, x, 1, "gradcam")
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and maps.std() > 0


def test_split_models_give_the_same_maps(resnet: nn.Module, vit: nn.Module) -> None:
    """SplitModel (encoder/head views, frozen encoder) is seen through: same layer, same maps."""
    x = _images(2, 28, seed=6)
    cnn = copy.deepcopy(resnet)
    split = split_model(cnn, "pooled")
    split.freeze_encoder()  # no parameter needs a gradient; input gradients must still flow
    assert gradcam_layer(split, x) == (cnn.layer4, "cnn")
    torch.testing.assert_close(attribute(split, x, 0, "gradcam"), attribute(cnn, x, 0, "gradcam"))
    torch.testing.assert_close(attribute(split, x, 0, "integrated_gradients", n_steps=8),
                               attribute(cnn, x, 0, "integrated_gradients", n_steps=8))
    xv = _images(2, 32, seed=7)
    v = copy.deepcopy(vit)
    for cut in ("pooled", "stage:1"):
        sv = split_model(v, cut)
        assert gradcam_layer(sv, xv) == (v.blocks[-1].norm1, "vit")
        torch.testing.assert_close(attribute(sv, xv, 1, "gradcam"), attribute(v, xv, 1, "gradcam"))


# ---------------------------------------------------------------- DeepLift and smooth nonlinearities


def test_uses_smooth_nonlinearity(resnet: nn.Module, lenet: nn.Module, vit: nn.Module) -> None:
    assert uses_smooth_nonlinearity(vit)
    assert not uses_smooth_nonlinearity(resnet)
    assert not uses_smooth_nonlinearity(lenet)
    assert uses_smooth_nonlinearity(nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU()))


def test_deeplift_refused_for_gelu_and_exact_for_relu(vit: nn.Module, lenet: nn.Module) -> None:
    with pytest.raises(ValueError, match="GELU"):
        attribute(vit, _images(1, 32), 0, "deeplift")
    x, t = _images(2, 28, seed=8), torch.tensor([0, 1])
    maps = attribute(lenet, x, t, "deeplift")
    diff = _logit(lenet, x, t) - _logit(lenet, torch.zeros_like(x), t)
    torch.testing.assert_close(maps.sum((1, 2)), diff, rtol=1e-3, atol=1e-5)


def test_deeplift_refused_when_summation_fails() -> None:
    """x**2 has no DeepLift rule in Captum: caught by the summation-to-delta check, not returned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), PolyActivation((0.0, 0.0, 1.0)), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="do not sum"):
        attribute(model, torch.randn(2, 1, 8, 8) * 3, 1, "deeplift")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"images": torch.zeros(1, 28, 28)}, "unsqueeze"),
        ({"images": torch.zeros(2, 1, 28, 28, dtype=torch.uint8)}, "float"),
        ({"images": torch.full((2, 1, 28, 28), float("nan"))}, "NaN"),
        ({"method": "lime"}, "integrated_gradients"),
        ({"target": 2}, "out of range"),
        ({"target": torch.tensor([0, 1, 1])}, "one class index per image"),
        ({"target": torch.tensor([0.0, 1.0])}, "integer class indices"),
        ({"n_step": 4}, "accepts"),
        ({"baseline": "white"}, "black"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_input_raises_helpful_value_error(lenet: nn.Module, kwargs: dict, match: str) -> None:
    args = {"images": torch.zeros(2, 1, 28, 28), "target": 1, "method": "integrated_gradients", **kwargs}
    with pytest.raises(ValueError, match=match):
        attribute(lenet, args.pop("images"), args.pop("target"), args.pop("method"), **args)


def test_gradcam_without_spatial_layer_is_refused() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="spatial"):
        attribute(mlp, torch.zeros(1, 1, 4, 4), 0, "gradcam")
