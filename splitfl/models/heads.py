"""Server-side heads built only from operations CKKS can evaluate.

Under CKKS the server can add, multiply by plaintext weights and multiply
ciphertexts, so a head must be affine layers plus *polynomial* activations.
ReLU/GELU heads are kept for plaintext baselines; ``'square'`` and ``'poly2'``
are the HE-friendly choices. HE code reads the weights through
``linear_layers()`` and the polynomial coefficients through
:attr:`PolyActivation.coeffs`, so plaintext and encrypted evaluation use the
very same numbers.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from .factory import ModelError

__all__ = [
    "ACTIVATIONS",
    "POLY2_RELU_COEFFS",
    "LinearHead",
    "MLPHead",
    "PolyActivation",
    "make_activation",
]

Activation = Literal["relu", "gelu", "square", "poly2"]
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "square", "poly2")

# 0.25 + 0.5 x + 0.125 x^2: the minimax quadratic for ReLU on [-4, 4] (the
# error equi-oscillates at x = -4, -2, 0, 2, 4 with magnitude 0.25). Ascending powers.
POLY2_RELU_COEFFS: tuple[float, float, float] = (0.25, 0.5, 0.125)


class PolyActivation(nn.Module):
    """Fixed polynomial ``sum_i coeffs[i] * x**i`` (coefficients in ascending powers).

    The coefficients are plain floats, not parameters, so they never train and
    HE code can read them as they are.
    """

    def __init__(self, coeffs: tuple[float, ...]) -> None:
        super().__init__()
        if len(coeffs) == 0:
            raise ModelError("PolyActivation needs at least one coefficient (ascending powers: c0, c1, ...).")
        self.coeffs: tuple[float, ...] = tuple(float(c) for c in coeffs)

    @property
    def degree(self) -> int:
        """Polynomial degree: sets the multiplicative depth it costs under CKKS."""
        return len(self.coeffs) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Horner's rule: for (0, 0, 1) this is exactly x * x.
        out = torch.full_like(x, self.coeffs[-1])
        for c in reversed(self.coeffs[:-1]):
            out = out * x + c
        return out

    def extra_repr(self) -> str:
        return f"coeffs={self.coeffs}"


def make_activation(name: Activation) -> nn.Module:
    """Activation module by name: 'relu', 'gelu' (plaintext only), 'square', 'poly2' (HE-friendly)."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "square":
        return PolyActivation((0.0, 0.0, 1.0))
    if name == "poly2":
        return PolyActivation(POLY2_RELU_COEFFS)
    raise ModelError(f"Unknown head activation {name!r}; choose one of {list(ACTIVATIONS)} (model.mlp_activation).")


class LinearHead(nn.Module):
    """One affine layer: the cheapest head under HE (one plaintext matmul)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearHead":
        """Wrap an existing layer *without copying*, so the head shares a model's classifier weights."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.linear = linear
        return head

    def linear_layers(self) -> list[nn.Linear]:
        """The affine layers in evaluation order (for HE code)."""
        return [self.linear]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class MLPHead(nn.Module):
    """Linear -> activation -> Linear: a deeper head to move more compute to the HE server."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, activation: Activation = "relu") -> None:
        super().__init__()
        if hidden < 1 or in_features < 1 or num_classes < 1:
            raise ModelError(
                f"MLPHead sizes must be positive: in_features={in_features}, hidden={hidden}, "
                f"num_classes={num_classes} (model.mlp_hidden)."
            )
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.activation = activation

    def linear_layers(self) -> list[nn.Linear]:
        """The affine layers in evaluation order (for HE code); ``self.act`` sits between them."""
        return [self.fc1, self.fc2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
