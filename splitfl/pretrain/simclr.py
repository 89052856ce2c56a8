"""SimCLR pretraining (Chen et al. 2020) of any timm model with ``forward_features`` and pooling.

Two augmented views of every image go through the encoder (the timm model's
own ``forward_features`` then ``forward_head(pre_logits=True)``: the pooled
features splitfl's ``pooled`` cut hands to the head downstream) and a 2-layer
projection MLP; the NT-Xent loss pulls each pair together against the other
2B - 2 views of the batch. The projection MLP is discarded after pretraining.
With several devices the negatives are the ones on each device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitfl.pretrain.augment import simclr_view
from splitfl.pretrain.config import PretrainError, SimCLRConfig


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross entropy: view i of one image must pick its other view among all 2B - 1 others."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own positive
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def check_pooled(model: nn.Module, name: str) -> nn.Module:
    """The model if it yields pooled features through timm's forward methods, else a PretrainError."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head") and hasattr(model, "num_features")):
        raise PretrainError(
            f"method simclr needs a timm model with forward_features, forward_head and num_features (pooled "
            f"features); model.name {name!r} ({type(model).__name__}) has not"
        )
    return model


class SimCLR(nn.Module):
    """Encoder (the timm model, unchanged) + projection MLP; ``forward`` returns the NT-Xent loss of two views."""

    def __init__(self, model: nn.Module, cfg: SimCLRConfig) -> None:
        super().__init__()
        self.encoder = model
        self.cfg = cfg
        self.projector = nn.Sequential(
            nn.Linear(int(model.num_features), cfg.proj_hidden),
            nn.BatchNorm1d(cfg.proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden, cfg.proj_dim),
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features, as splitfl's ``pooled`` encoder computes them."""
        return self.encoder.forward_head(self.encoder.forward_features(images), pre_logits=True)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        v1 = simclr_view(images, self.cfg, generator)
        v2 = simclr_view(images, self.cfg, generator)
        z = self.projector(self.features(torch.cat([v1, v2])))  # one pass: BatchNorm sees both views
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.cfg.temperature)


def build_simclr(model: nn.Module, name: str, cfg: SimCLRConfig) -> SimCLR:
    return SimCLR(check_pooled(model, name), cfg)
