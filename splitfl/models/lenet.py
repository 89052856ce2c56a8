"""``splitfl_lenet``: the small sigmoid LeNet of the gradient-inversion literature, as a timm model.

Deep Leakage from Gradients (Zhu et al. 2019) and its successors measure
leakage on this network: three 5x5 convolutions with sigmoids and one linear
layer. Its smooth activations and small size make gradient matching work at
its best within CPU minutes, so it is what the attack configs
(``configs/attack/``) train: the leakage they report is the attacker's best
case. Registered with timm so every splitfl regime (split cuts, FedAvg,
Opacus) builds it like any other architecture: ``model.name: splitfl_lenet``.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn

__all__ = ["SigmoidLeNet", "splitfl_lenet"]


class SigmoidLeNet(nn.Module):
    """Convolutions with strides 2, 2, 1 (5x5, sigmoid), flattened features, one linear classifier.

    Implements timm's model interface (``forward_features``, ``forward_head``,
    ``get_classifier``, ``reset_classifier``, ``num_features``) so splitfl's
    pooled and MLP cuts apply. ``uniform_init`` is DLG's U(-0.5, 0.5) for
    every weight and bias (larger than PyTorch's default; gradients then carry
    more of the input).
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 1, img_size: int = 28, width: int = 12,
                 drop_rate: float = 0.0, uniform_init: bool = True) -> None:
        super().__init__()
        if img_size < 4:
            raise ValueError(f"splitfl_lenet needs images of at least 4 px, got img_size={img_size}")
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        side = (img_size + 3) // 4
        self.num_features = width * side * side
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {"architecture": "splitfl_lenet", "input_size": (in_chans, img_size, img_size)}
        if uniform_init:
            with torch.no_grad():
                for p in self.parameters():
                    p.uniform_(-0.5, 0.5)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def splitfl_lenet(pretrained: bool = False, **kwargs: Any) -> SigmoidLeNet:
    """timm entry point; ``img_size`` sets the classifier's width (the flattened 1/4-resolution map)."""
    if pretrained:
        raise ValueError("splitfl_lenet has no pretrained weights; load a local checkpoint with model.checkpoint")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's bookkeeping, not ours
        kwargs.pop(key, None)
    return SigmoidLeNet(**kwargs)
