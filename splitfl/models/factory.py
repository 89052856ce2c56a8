"""Create timm models for small medical images, with errors a user can act on.

timm builds every architecture; this module only adds what medical benchmarks
need on top: a clear error for a mistyped model name, and a *small-input stem*
so that 28-64 px images (MedMNIST) are not downsampled to nothing by an
ImageNet stem. Weights always start random here (``pretrained=False``):
foundation weights come from a local file via :mod:`splitfl.models.checkpoint`.
"""
from __future__ import annotations

import difflib
from typing import Any, Optional

import timm
import torch.nn as nn
from timm.models import is_model_in_modules
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

from splitfl.errors import UserError

__all__ = ["ModelError", "create_model", "SMALL_INPUT_VIT_PATCH"]

# Patch size used for ViTs when ``small_input_stem`` is on and none is given:
# 28 px / 4 = a 7x7 token grid, the same spatial size a ResNet reaches at stride 4.
SMALL_INPUT_VIT_PATCH = 4
# Largest image size for which the ViT small-input patch size is applied.
_SMALL_INPUT_MAX_SIZE = 64


class ModelError(UserError, ValueError):
    """Bad model name, argument, cut or checkpoint; the message says what to change."""


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    img_size: Optional[int] = None,
    small_input_stem: bool = False,
    drop_rate: float = 0.0,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a randomly initialised timm model, optionally adapted to small images.

    Args:
        name: timm model name (``timm.list_models()``), optionally with a
            ``.tag`` suffix; the tag only selects ``model.pretrained_cfg``.
        num_classes: number of logits of the classifier.
        in_chans: image channels (1 for grey-scale X-ray/CT, 3 for RGB).
        img_size: input size for architectures that depend on it (ViT position
            embeddings); ignored by convolutional nets, which accept any size.
        small_input_stem: adapt the stem to 28-64 px images, see
            :func:`adapt_small_input_stem`. For ViTs it selects
            ``patch_size=4`` when ``img_size <= 64`` and no ``patch_size`` is given.
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
        **timm_kwargs: passed to :func:`timm.create_model` (e.g. ``patch_size``,
            ``drop_path_rate``).

    Raises:
        ModelError: unknown name (with close matches), invalid sizes, or an
            argument the architecture does not accept.
    """
    _check_name(name)
    if num_classes < 0:
        raise ModelError(f"create_model({name!r}): num_classes={num_classes} must be >= 0 (0 = no classifier).")
    if in_chans < 1:
        raise ModelError(f"create_model({name!r}): in_chans={in_chans} must be >= 1 (image channels).")
    if img_size is not None and img_size < 1:
        raise ModelError(f"create_model({name!r}): img_size={img_size} must be a positive number of pixels.")
    if not 0.0 <= drop_rate < 1.0:
        raise ModelError(f"create_model({name!r}): drop_rate={drop_rate} must be in [0, 1).")

    kwargs = dict(timm_kwargs, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if img_size is not None:
        kwargs["img_size"] = img_size  # dropped again for architectures that refuse it
        if small_input_stem and img_size <= _SMALL_INPUT_MAX_SIZE and is_model_in_modules(name, ["vision_transformer"]):
            kwargs.setdefault("patch_size", SMALL_INPUT_VIT_PATCH)

    model = _timm_create(name, kwargs)
    if isinstance(model, VisionTransformer) and img_size is not None:
        _check_vit_grid(name, model, img_size)
    if small_input_stem:
        adapt_small_input_stem(model)
    return model


def adapt_small_input_stem(model: nn.Module) -> bool:
    """Reduce the stem's downsampling in place, for 28-64 px inputs; True if changed.

    Mirrors the MedMNIST v2 ResNet-18 (28) baseline, which keeps full
    resolution into the first residual stage:

    * ResNet: ``conv1`` becomes a 3x3 stride-1 conv (padding 1, no bias) and
      ``maxpool`` an ``Identity`` (stem stride 4 -> 1). Deep stems
      (``resnet*d``) keep their convs but with stride 1.
    * ConvNeXt: the 4x4/stride-4 patchify stem becomes 2x2/stride-2 (still
      patchify; a 28 px image ends at 1x1 after the last stage instead of
      failing at 0x0). Overlapping stems lose the stride of their second conv.
    * EfficientNet: ``conv_stem`` stride 2 -> 1.
    * ViT and other families: nothing to change here; ViTs use a small
      ``patch_size`` and ``img_size`` instead (see :func:`create_model`).

    ``model.pretrained_cfg`` is left intact (its ``first_conv`` name still
    holds); ``feature_info`` reductions are not updated.
    """
    if isinstance(model, ResNet):
        if isinstance(model.conv1, nn.Conv2d):
            old = model.conv1
            model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        else:  # deep stem: Sequential of 3x3 convs, the first with stride 2
            _set_conv_strides(model.conv1, 1)
        model.maxpool = nn.Identity()
        return True
    if isinstance(model, ConvNeXt):
        convs = [m for m in model.stem if isinstance(m, nn.Conv2d)]
        if len(convs) == 1:  # patchify stem
            old = convs[0]
            new = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=2, stride=2, bias=old.bias is not None)
            idx = next(i for i, m in enumerate(model.stem) if m is old)
            model.stem[idx] = new
        else:  # overlapping stem: two 3x3 stride-2 convs, keep only the first stride
            convs[-1].stride = (1, 1)
        return True
    if isinstance(model, EfficientNet):
        model.conv_stem.stride = (1, 1)
        return True
    return False


def _set_conv_strides(module: nn.Module, stride: int) -> None:
    """Set the stride of every Conv2d in ``module`` (used for ResNet deep stems)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (stride, stride)


def _check_name(name: str) -> None:
    """Fail early on a mistyped name, suggesting the nearest timm names."""
    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ModelError(
        f"Unknown model name {name!r}: timm {timm.__version__} has no such architecture.{hint} "
        "Set model.name to one of timm.list_models() (e.g. 'resnet18', 'convnext_atto', "
        "'efficientnet_b0', 'vit_tiny_patch16_224')."
    )


def _timm_create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Call timm.create_model, turning argument errors into ModelError.

    ``img_size`` is optional for convolutional nets: if the architecture
    refuses it, it is dropped (they work at any input size).
    """
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if "img_size" in str(e) and "img_size" in kwargs:
            rest = {k: v for k, v in kwargs.items() if k != "img_size"}
            return _timm_create(name, rest)
        bad = sorted(set(kwargs) - {"num_classes", "in_chans", "drop_rate"})
        raise ModelError(
            f"timm model {name!r} rejected its arguments ({e}). Extra arguments given: {bad}; "
            "remove the ones this architecture does not take."
        ) from None
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ModelError(
            f"timm could not build {name!r} with {kwargs}: {e}. Check the sizes/arguments for this architecture."
        ) from None


def _check_vit_grid(name: str, model: VisionTransformer, img_size: int) -> None:
    """A ViT needs the image size to be a multiple of its patch size."""
    patch = model.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if img_size % patch:
        raise ModelError(
            f"{name!r}: img_size={img_size} is not a multiple of patch_size={patch}; "
            f"pass patch_size=... dividing {img_size} (e.g. 4 for 28 px) or resize the images."
        )
