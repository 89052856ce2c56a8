"""The model a malicious consortium config names: a timm image model behind a benign imprint block.

The attacker of :mod:`attacks.malicious_fed` gets the imprint block of
:mod:`attacks.imprint` into the hospitals' model without touching their code:
these timm entry points (``imprint_resnet18``, ``imprint_splitfl_lenet``) are
registered with timm, the consortium's config names one, and the hospitals'
unmodified model factory builds it. Built benign (``W2 = 0``: exactly the inner
model), the block does nothing until the server broadcasts crafted weights.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import register_model
from torch import nn

from attacks.imprint import ImprintBlock
from splitfl.models import ModelError, create_model

__all__ = ["DEFAULT_BINS", "IMPRINT_MODEL_PREFIX", "ImprintFront", "imprint_resnet18", "imprint_splitfl_lenet"]

IMPRINT_MODEL_PREFIX = "imprint_"
DEFAULT_BINS = 256


class ImprintFront(nn.Module):
    """An :class:`ImprintBlock` in front of a timm image model, with timm's interface (so splitfl's cuts apply).

    Built benign: W1 and b1 at PyTorch's default initialisation, ``W2 = 0``, so ``forward`` is exactly the
    inner model's until someone writes other weights into the block. Parameters are named
    ``imprint.linear_in.*``, ``imprint.linear_out.weight`` and ``model.*`` (the inner model's).
    """

    def __init__(self, inner: nn.Module, image_shape: Sequence[int], bins: int, architecture: str) -> None:
        super().__init__()
        self.imprint = ImprintBlock(image_shape, bins)
        with torch.no_grad():
            self.imprint.linear_out.weight.zero_()
        self.model = inner
        self.num_classes = int(getattr(inner, "num_classes", 0) or 0)
        self.num_features = int(inner.num_features)
        self.pretrained_cfg = {"architecture": architecture, "input_size": tuple(self.imprint.image_shape)}

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        self.model.reset_classifier(num_classes, *args, **kwargs)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.imprint(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _imprint_front(inner_name: str, pretrained: bool, kwargs: dict[str, Any]) -> ImprintFront:
    """timm entry point body: ``imprint_bins`` (timm_kwargs) rows; ``img_size`` and ``in_chans`` give the block's input."""
    if pretrained:
        raise ModelError(f"{IMPRINT_MODEL_PREFIX}{inner_name} has no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's bookkeeping
        kwargs.pop(key, None)
    bins = int(kwargs.pop("imprint_bins", DEFAULT_BINS))
    img_size = kwargs.pop("img_size", None)
    if img_size is None:
        raise ModelError(f"{IMPRINT_MODEL_PREFIX}{inner_name} needs img_size (the block is a dense layer on the image)")
    in_chans = int(kwargs.pop("in_chans", 3))
    num_classes = int(kwargs.pop("num_classes", 2))
    drop_rate = float(kwargs.pop("drop_rate", 0.0))
    inner = create_model(inner_name, num_classes=num_classes, in_chans=in_chans, img_size=int(img_size),
                         drop_rate=drop_rate, **kwargs)
    return ImprintFront(inner, (in_chans, int(img_size), int(img_size)), bins, IMPRINT_MODEL_PREFIX + inner_name)


@register_model
def imprint_resnet18(pretrained: bool = False, **kwargs: Any) -> ImprintFront:
    """timm's ResNet-18 behind a benign imprint block (``model.timm_kwargs: {imprint_bins: N}``)."""
    return _imprint_front("resnet18", pretrained, kwargs)


@register_model
def imprint_splitfl_lenet(pretrained: bool = False, **kwargs: Any) -> ImprintFront:
    """splitfl's sigmoid LeNet behind a benign imprint block: the small model of the tests."""
    return _imprint_front("splitfl_lenet", pretrained, kwargs)
