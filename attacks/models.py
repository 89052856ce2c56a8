"""The small sigmoid LeNet that DLG (Zhu et al. 2019) attacks.

Sigmoid activations (not ReLU) keep the network twice-differentiable with
informative second derivatives everywhere, which is what lets gradient
matching recover pixels; this model is the standard yardstick for
"how well can the attack work at best".
"""
from __future__ import annotations

import torch
from torch import nn


class LeNetDLG(nn.Module):
    """Three stride-(2, 2, 1) 5x5 convolutions with sigmoids and one linear layer.

    ``H`` and ``W`` may be any size >= 4: the linear layer's width follows
    from the two stride-2 convolutions (ceil(H/4) * ceil(W/4) * 12 features).
    """

    def __init__(self, in_channels: int = 1, height: int = 28, width: int = 28, num_classes: int = 2,
                 hidden: int = 12, uniform_init: bool = True) -> None:
        super().__init__()
        if min(height, width) < 4:
            raise ValueError(f"LeNetDLG needs images of at least 4x4 px, got {height}x{width}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(hidden, hidden, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(hidden, hidden, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        h, w = (height + 3) // 4, (width + 3) // 4
        self.fc = nn.Linear(hidden * h * w, num_classes)
        if uniform_init:
            self.uniform_init_()

    def uniform_init_(self, low: float = -0.5, high: float = 0.5) -> LeNetDLG:
        """DLG's init: every weight and bias ~ U(-0.5, 0.5) (larger than PyTorch's, so gradients carry more)."""
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(low, high)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def lenet_dlg(in_channels: int = 1, height: int = 28, width: int = 28, num_classes: int = 2,
              seed: int | None = 0, uniform_init: bool = True) -> LeNetDLG:
    """A seeded LeNetDLG (seed=None keeps the global RNG state)."""
    if seed is None:
        return LeNetDLG(in_channels, height, width, num_classes, uniform_init=uniform_init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LeNetDLG(in_channels, height, width, num_classes, uniform_init=uniform_init)
