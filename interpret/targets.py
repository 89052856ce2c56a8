"""Which layer Grad-CAM reads, and which models Captum's DeepLift cannot explain.

Grad-CAM needs the last layer that still has a spatial layout. Module names
differ across timm families and splitfl's :class:`~splitfl.models.SplitModel`
wraps the backbone in encoder/head views, so the layer is found by *running*
the model once with forward hooks rather than by name:

* CNNs: the last module, in execution order, whose output is a 4-D
  ``(B, C, h, w)`` tensor with ``h * w > 1`` (the last conv stage; for a
  ResNet the ``layer4`` container). The same search sees through a
  ``SplitModel``, whose head may hold the last stages.
* ViTs (timm ``VisionTransformer`` or anything with ``blocks`` and
  ``num_prefix_tokens``): the last transformer block, kind ``"vit"``. If the
  classifier reads only the class token (``global_pool='token'``), the
  patch tokens *after* the last block never reach the logits (their gradient
  is exactly zero), so the layer is that block's ``norm1`` instead: the
  tokens its attention reads, the choice of the pytorch-grad-cam library.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
from timm.models import vision_transformer as tvit
from timm.models.vision_transformer import VisionTransformer

try:  # timm's own smooth activations; where its layout differs, the torch classes still cover its defaults
    from timm.layers import activations as timm_activations
except ImportError:  # pragma: no cover - depends on the timm version
    timm_activations = None
try:  # the memory-efficient variants, absent from some timm versions
    from timm.layers import activations_me as timm_activations_me
except ImportError:  # pragma: no cover - depends on the timm version
    timm_activations_me = None

__all__ = [
    "GradCamKind",
    "find_vit",
    "gradcam_layer",
    "smooth_nonlinearities",
    "uses_smooth_nonlinearity",
    "vit_token_layout",
]

GradCamKind = Literal["cnn", "vit"]


# ---------------------------------------------------------------- ViT discovery


def _is_vit_like(module: nn.Module) -> bool:
    if isinstance(module, VisionTransformer):
        return True
    return hasattr(module, "num_prefix_tokens") and ("blocks" in module._modules or "patch_embed" in module._modules)


def find_vit(model: nn.Module) -> Optional[nn.Module]:
    """The first ViT-like module inside ``model`` (itself included), or None.

    Walks all modules so that a ViT wrapped by splitfl's ``SplitModel``
    (where the encoder/head hold *views* of the VisionTransformer) is found.
    Prefers a view that still owns its ``blocks``.
    """
    found = [m for m in model.modules() if _is_vit_like(m)]
    if not found:
        return None
    with_blocks = [m for m in found if "blocks" in m._modules]
    return (with_blocks or found)[0]


def _vit_block_types(model: nn.Module) -> tuple[type, ...]:
    """Classes of the transformer blocks: taken from any ``blocks`` container, else timm's known ones."""
    types: set[type] = set()
    for m in model.modules():
        if _is_vit_like(m) and "blocks" in m._modules:
            types.update(type(b) for b in m._modules["blocks"].children())
    if not types:
        for name in ("Block", "ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock"):
            if hasattr(tvit, name):
                types.add(getattr(tvit, name))
    return tuple(types)


def _vit_reads_only_prefix(model: nn.Module) -> bool:
    """True if the classifier sees only the prefix (class) token, so post-block patch tokens get no gradient."""
    pools = {getattr(m, "global_pool", None) for m in model.modules() if _is_vit_like(m)}
    return "token" in pools


def vit_token_layout(model: nn.Module, image_hw: tuple[int, int], n_tokens: int) -> tuple[int, tuple[int, int]]:
    """``(num_prefix_tokens, (grid_h, grid_w))`` for a ViT fed images of size ``image_hw``.

    The grid comes from the patch size (``patch_embed.patch_size``) and the
    image size; it must account for every non-prefix token.

    Raises:
        ValueError: the token count does not match a patch grid (e.g. a ViT
            with pooled or merged tokens), so Grad-CAM has no spatial layout.
    """
    vit = find_vit(model)
    if vit is None:
        raise ValueError(f"{type(model).__name__} contains no ViT (no module with num_prefix_tokens and blocks).")
    prefix = int(getattr(vit, "num_prefix_tokens", 0))
    n_patch = n_tokens - prefix
    patch = None
    for m in model.modules():
        pe = m._modules.get("patch_embed") if _is_vit_like(m) else None
        if pe is not None and hasattr(pe, "patch_size"):
            patch = pe.patch_size
            break
    h, w = image_hw
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (-(-h // ph), -(-w // pw)) if getattr(pe, "dynamic_img_pad", False) else (h // ph, w // pw)
        if grid[0] * grid[1] == n_patch:
            return prefix, grid
    side = int(round(n_patch ** 0.5))
    if side * side == n_patch and n_patch > 0:
        return prefix, (side, side)
    raise ValueError(
        f"ViT Grad-CAM: {n_tokens} tokens minus {prefix} prefix tokens do not form a patch grid for "
        f"{h}x{w} images (patch size {patch}). Use another method (integrated_gradients, occlusion, smoothgrad)."
    )


# ---------------------------------------------------------------- Grad-CAM layer


def _execution_order(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, output) for every module, in the order their forwards *finish*, from one eval no-grad pass."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            seen.append((module, output.detach()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    states = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        param = next(model.parameters(), None)
        x = example[:1].to(param.device) if param is not None else example[:1]
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, was in states:
            m.training = was
    return seen


def gradcam_layer(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, GradCamKind]:
    """The module whose output Grad-CAM should weight, and the kind of model (``"cnn"`` or ``"vit"``).

    Args:
        model: a classifier (timm model or splitfl ``SplitModel``).
        example: images ``(B, C, H, W)``; only ``example[:1]`` is run, once,
            in eval mode without gradients.

    Raises:
        ValueError: no module produces a spatial (4-D, more than 1x1) output,
            e.g. an MLP or an image so small the last stage is 1x1.
    """
    if example.dim() != 4:
        raise ValueError(f"gradcam_layer needs images (B, C, H, W); got shape {tuple(example.shape)}.")
    if find_vit(model) is not None:
        block_types = _vit_block_types(model)
        order = _execution_order(model, example)
        blocks = [m for m, _ in order if isinstance(m, block_types)]
        if not blocks:
            raise ValueError(f"ViT Grad-CAM: no transformer block ran in {type(model).__name__}'s forward.")
        last = blocks[-1]
        if _vit_reads_only_prefix(model) and isinstance(getattr(last, "norm1", None), nn.Module):
            return last.norm1, "vit"
        return last, "vit"
    order = _execution_order(model, example)
    spatial = [m for m, out in order if out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1]
    if not spatial:
        raise ValueError(
            f"Grad-CAM needs a layer with a spatial output, but no module of {type(model).__name__} produces a "
            f"4-D output larger than 1x1 for {tuple(example.shape[1:])} images. Use integrated_gradients, "
            "occlusion or smoothgrad instead."
        )
    return spatial[-1], "cnn"


# ---------------------------------------------------------------- smooth nonlinearities


def _smooth_types() -> tuple[type, ...]:
    types: list[type] = [nn.GELU, nn.SiLU, nn.Mish]
    if timm_activations is not None:
        types += [getattr(timm_activations, n) for n in ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish")
                  if hasattr(timm_activations, n)]
    if timm_activations_me is not None:
        types += [getattr(timm_activations_me, n) for n in ("SwishMe", "MishMe") if hasattr(timm_activations_me, n)]
    return tuple(types)


def smooth_nonlinearities(model: nn.Module) -> list[str]:
    """Names of the GELU/SiLU/Swish/Mish modules in ``model`` (empty if none)."""
    types = _smooth_types()
    return [name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, types)]


def uses_smooth_nonlinearity(model: nn.Module) -> bool:
    """True if ``model`` contains a GELU, SiLU/Swish or Mish module (torch's or timm's).

    Captum 0.9.0's DeepLift has rescale rules only for ReLU, ELU, LeakyReLU,
    Sigmoid, Tanh, Softplus, max-pool and softmax; any other nonlinearity is
    back-propagated as a plain gradient, so its attributions no longer sum to
    ``f(x) - f(baseline)`` and are silently wrong. ViTs (GELU) and
    EfficientNets (SiLU) are therefore not explained with DeepLift.
    """
    return bool(smooth_nonlinearities(model))
