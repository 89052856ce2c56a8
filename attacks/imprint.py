"""Imprint-module attack of "Robbing the Fed" (Fowl, Geiping, Czaja, Goldblum, Goldstein, ICLR 2022).

A *malicious* server (stronger than the honest-but-curious one of
``attacks/README.md``: it changes the model it broadcasts) puts a small
residual block in front of the image model::

    out = x + W2 ReLU(W1 x + b1)          x flattened to d = C*H*W

Every row of ``W1`` is the same measurement direction ``m`` (default: mean
brightness) and the biases are ``b1_i = -c_i`` with thresholds
``c_0 < c_1 < ...``, so row ``i`` is active exactly for the images with
``m.x > c_i``: the rows form *cumulative* bins. Every column of ``W2`` is the
same vector, so the loss depends on image ``n``'s bin activations only
through their sum, and the loss gradient w.r.t. ``h_{n,i} = W1_i x_n + b1_i``
is one scalar ``g_n`` for all active rows ``i``. For a batch of ``B`` images::

    dL/dW1_i = (1/B) sum_{n: m.x_n > c_i} g_n x_n,     dL/db1_i = (1/B) sum_{n: m.x_n > c_i} g_n

so consecutive rows differ by the images *in* bin ``i`` (``c_i < m.x <= c_{i+1}``) alone::

    (dW_i - dW_{i+1}) / (db_i - db_{i+1}) = sum_{n in bin i} g_n x_n / sum_{n in bin i} g_n

which is image ``x_n`` itself, exactly, when the bin holds one image, and a
weighted mixture of the bin's images otherwise. Nothing is optimised: one
subtraction and one division per bin, for any batch size, any model behind
the block (batch norm included) and any loss.

Choices, and why:

* **Measurement** ``m = 1/d`` (mean brightness): cheap, every image has one,
  and on X-rays it varies continuously from image to image, so a batch spreads
  over the bins. Any fixed direction works (``measurement=``); the attack only
  needs images to differ along it.
* **Thresholds** are quantiles of ``m.x`` over the attacker's *own* auxiliary
  images (never the hospitals'): the cut points at levels ``k / bins`` give each
  bin the same share of the image distribution, which minimises collisions of
  two images in one bin (with ``bins`` equal bins and a batch of ``B``, an image
  is alone in its bin with probability ``(1 - 1/bins)^(B-1)``: 0.97 at B = 8,
  0.89 at B = 32, 0.78 at B = 64 for 256 bins). The lowest threshold ``c_0`` is
  the minimum of ``m.x`` over the whole valid image box (``-1`` for mean
  brightness in [-1, 1]) minus a margin, so every image activates row 0 and
  none escapes below the first bin; the last bin is open upwards.
* **W2**: all columns equal ``s u`` with ``u`` a fixed random pixel pattern
  (unit RMS) and ``s`` a scalar. Equal columns are what makes ``g_n`` the
  same for every row; with independent random columns each row gets its own
  ``g_{n,i}`` and the differences above no longer cancel the images of the
  higher bins (the tests measure this). ``u`` is random rather than constant
  only so that the residual looks like faint noise instead of a brightness
  shift; a constant ``u`` recovers as well (measured: same rates, bias gaps
  about 2.5x smaller at batch 32). ``s`` is set
  so that on the auxiliary images the residual's RMS is ``residual_scale``
  (default 0.01 in [-1, 1] units, about one 8-bit grey level): the model behind
  still sees the image, changed by about one grey level (accuracy under the
  block was not measured here).
* **Gain**: ``W1 = gain * m`` and ``b1 = -gain * c`` with ``W2 = (s / gain) u 1^T``:
  the forward pass and the gradient
  ``g_n x_n`` do not depend on ``gain``, but the stored weights do. The server
  reads the update as ``w_after - w_before`` of float32 weights, whose rounding
  error is relative to the weights; small weights (``gain = 1e-3``) keep the
  update of ``b1`` many orders of magnitude above that rounding, so a lone image
  comes back to ~1e-7 (measured at one SGD step: gain 1e-3 -> 6e-8, 1e-2 -> 5e-6,
  1e-1 -> 7e-5, 1 -> a 1e-2 error and a spurious extra candidate). The price:
  the update of ``W1`` is then large next to ``W1`` itself, so one step wrecks the
  bins for *other* images (see below).

**Gradient or update.** One SGD step sends ``w_after - w_before = -lr * grad``
(the batch mean ``1/B`` is inside ``grad``). Both numerator and denominator of
the ratio carry the same factor ``-lr / B``, so :func:`recover` accepts the
gradient, the update, or ``w_before - w_after`` alike.

**What it survives, what breaks it** (resnet18, 256 bins, 32 synthetic X-rays,
``tests/test_attacks_imprint.py``):

* a sum of several sites' updates (secure aggregation, HE-summed FedAvg): the
  aggregate is linear in the per-image terms, so it is one batch of all the
  sites' images: 4 sites x 8 images recover like a batch of 32 (97 %);
* several local steps on the *same* images: the update is a sum over steps of
  ``g_n^(t) x_n`` and the ratio is still ``x_n`` while bin membership holds
  (5 steps: 94 %; 20 steps at lr 0.1: ~78 %);
* local steps on *different* minibatches (a local epoch) break it: the first
  step moves every ``W1`` row by a multiple of its images, rows stop being one
  measurement, and later images fall into scrambled bins (4 x 8: ~22 %;
  a larger ``gain`` helps here, 0.5-0.75 at gain 1, at the cost of precision).
  Bins shift by ~ lr / gain^2 of their width, so at a hospital's own settings the
  gain can be chosen: :mod:`attacks.malicious_fed` picks it by simulating a
  hospital's round on the attacker's images and keeps > 90 % of a 4-step local
  epoch at lr 0.003 with momentum 0.9 (ResNet-18, PneumoniaMNIST);
* Gaussian noise on the update (DP): each bin's signal is a tiny part of the
  update's norm, so noise of 1e-5 x ||update|| per coordinate already costs
  some images (84 %) and 1e-3 x ||update|| leaves none; real DP-SGD noise
  (order ||clip|| per coordinate) leaves nothing;
* the attack needs the server to *change the model* (a dense layer in front of
  a CNN, a W1 update dominating the update's norm): a hospital that checks the
  broadcast weights against the previous round's (``fed.model_guard``) sees a
  one-round switch, but not a block active from the first model it accepts, nor
  one walked in by small steps over rounds (:mod:`attacks.malicious_fed`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attacks.metrics import DEFAULT_VALUE_RANGE, ValueRange

# Flat parameter names of the block inside :func:`imprinted` (FedAvg updates are keyed by these).
IMPRINT_WEIGHT = "imprint.linear_in.weight"
IMPRINT_BIAS = "imprint.linear_in.bias"

DEFAULT_RESIDUAL_SCALE = 1e-2
DEFAULT_GAIN = 1e-3
DEFAULT_MIN_BIAS_GAP = 1e-4


def _shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)!r}")
    return shape  # type: ignore[return-value]


class ImprintBlock(nn.Module):
    """Residual MLP on flattened images: ``out = x + W2 ReLU(W1 x + b1)``, shape (N, C, H, W) -> same.

    ``ImprintBlock(image_shape, bins)`` is an *ordinary* block (PyTorch's
    default random initialisation, no imprint); :meth:`calibrate` builds the
    attack's block. ``linear_in`` holds ``W1`` (bins x d) and ``b1``;
    ``linear_out`` holds ``W2`` (d x bins), without bias so the residual is
    zero where no bin is active. The thresholds ``c`` are kept as a
    non-persistent buffer (not part of the state dict, so the broadcast model
    carries no extra tensor).
    """

    def __init__(self, image_shape: Sequence[int], bins: int):
        super().__init__()
        self.image_shape = _shape(image_shape)
        if int(bins) < 2:
            raise ValueError(f"bins must be >= 2, got {bins!r}")
        d = math.prod(self.image_shape)
        self.bins = int(bins)
        self.linear_in = nn.Linear(d, self.bins)
        self.linear_out = nn.Linear(self.bins, d, bias=False)
        self.register_buffer("thresholds", torch.full((self.bins,), float("nan")), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"ImprintBlock expects (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        return x + self.linear_out(F.relu(self.linear_in(x.flatten(1)))).view_as(x)

    @classmethod
    @torch.no_grad()
    def calibrate(
        cls,
        aux_images: torch.Tensor,
        bins: int,
        measurement: torch.Tensor | None = None,
        residual_scale: float = DEFAULT_RESIDUAL_SCALE,
        gain: float = DEFAULT_GAIN,
        value_range: ValueRange = DEFAULT_VALUE_RANGE,
        seed: int = 0,
    ) -> ImprintBlock:
        """The attack's block, with bin thresholds at quantiles of ``m.x`` over ``aux_images`` (N, C, H, W).

        ``aux_images`` are the attacker's own images of the task's kind, in the
        model's ``value_range``; at least ``bins`` of them (one per bin), more is
        better. ``measurement`` (shape (C, H, W) or (d,)) defaults to mean
        brightness ``1/d``. ``residual_scale``: RMS of the residual over the
        auxiliary images (the largest), in input units. ``gain`` scales W1/b1
        down and W2 up (see module docstring). ``seed`` draws W2's pixel pattern.
        """
        if aux_images.ndim != 4:
            raise ValueError(f"aux_images must be (N, C, H, W), got {tuple(aux_images.shape)}")
        block = cls(aux_images.shape[1:], bins)
        d = math.prod(block.image_shape)
        if len(aux_images) < block.bins:
            raise ValueError(f"calibration needs at least one auxiliary image per bin: {len(aux_images)} images "
                             f"for {block.bins} bins")
        if not residual_scale > 0 or not gain > 0:
            raise ValueError(f"residual_scale and gain must be > 0, got {residual_scale!r}, {gain!r}")
        m = torch.full((d,), 1.0 / d, dtype=torch.float64) if measurement is None else \
            measurement.detach().reshape(-1).to(torch.float64)
        if m.numel() != d or not bool(m.abs().sum() > 0):
            raise ValueError(f"measurement must be a non-zero tensor with {d} entries, got shape "
                             f"{tuple(measurement.shape) if measurement is not None else None}")
        proj = aux_images.detach().reshape(len(aux_images), -1).to(torch.float64) @ m
        levels = torch.arange(1, block.bins, dtype=torch.float64) / block.bins
        cuts = torch.quantile(proj, levels)
        # Row 0 must be active for every valid image: its threshold is the box minimum of m.x, minus a margin
        # (ReLU's derivative at exactly 0 is 0 in torch, so an image on the threshold would add nothing).
        lo, hi = float(value_range[0]), float(value_range[1])
        box_min = float(torch.where(m > 0, lo * m, hi * m).sum())
        spread = float(proj.max() - proj.min()) or 1.0
        c = torch.cat([torch.tensor([min(box_min, float(cuts[0])) - 1e-3 * spread], dtype=torch.float64), cuts])

        gen = torch.Generator().manual_seed(int(seed))
        u = torch.randn(d, generator=gen, dtype=torch.float64)
        u /= u.pow(2).mean().sqrt()  # unit RMS
        # Residual of image x: s * u * sum_i relu(m.x - c_i); its RMS over pixels is s * sum_i relu(m.x - c_i).
        load = (proj[:, None] - c[None, :]).clamp(min=0).sum(dim=1).max()
        s = float(residual_scale) / float(load)

        block.linear_in.weight.copy_((gain * m).expand(block.bins, d))
        block.linear_in.bias.copy_(-gain * c)
        block.linear_out.weight.copy_((s / gain) * u[:, None].expand(d, block.bins))
        block.thresholds.copy_(c)
        return block


class ImprintedModel(nn.Module):
    """``model(imprint(x))``; parameters are named ``imprint.*`` and ``model.*`` (see ``IMPRINT_WEIGHT``)."""

    def __init__(self, model: nn.Module, block: ImprintBlock):
        super().__init__()
        self.imprint = block
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.imprint(x))


def imprinted(model: nn.Module, block: ImprintBlock) -> ImprintedModel:
    """Put ``block`` in front of an image model (e.g. a timm ``resnet18``); W1/b1 are ``IMPRINT_WEIGHT``/``IMPRINT_BIAS``."""
    return ImprintedModel(model, block)


def imprint_tensors(named: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """W1 and b1 (their gradient, update or value) out of a flat ``{name: tensor}`` dict of an imprinted model."""
    missing = [k for k in (IMPRINT_WEIGHT, IMPRINT_BIAS) if k not in named]
    if missing:
        raise KeyError(f"no imprint block in this update: missing {missing}; build the model with imprinted()")
    return named[IMPRINT_WEIGHT], named[IMPRINT_BIAS]


@torch.no_grad()
def recover(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    image_shape: Sequence[int],
    min_bias_gap: float = DEFAULT_MIN_BIAS_GAP,
    value_range: ValueRange = DEFAULT_VALUE_RANGE,
    limit: int | None = None,
) -> torch.Tensor:
    """Candidate images (K, C, H, W) from the gradient/update of W1 (bins x d) and b1 (bins,).

    Rows must be in order of increasing threshold (as :meth:`ImprintBlock.calibrate`
    builds them). Bin ``i`` gives ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})``, the
    last bin (open upwards) ``dW_last / db_last``. Bins whose bias gap is at most
    ``min_bias_gap`` times the largest gap are skipped: they are empty up to
    float rounding (the threshold is relative, so the gradient, the update at
    any learning rate and either sign all give the same candidates). Each
    candidate is one image when its bin held one image, a weighted mixture of
    the bin's images otherwise; clamped to ``value_range``. Computed in float64.
    ``limit``: keep at most this many bins, those with the largest gaps (in bin
    order): an attacker who knows how many images are behind the update scores
    that many candidates and no more, so that extra candidates cannot raise its
    odds of a lucky match.
    """
    shape = _shape(image_shape)
    d = math.prod(shape)
    w = weight_grad.detach().to(torch.float64).cpu()
    b = bias_grad.detach().to(torch.float64).cpu().reshape(-1)
    if w.ndim != 2 or w.shape[1] != d or b.shape[0] != w.shape[0]:
        raise ValueError(f"need W1 of shape (bins, {d}) and b1 of shape (bins,), got {tuple(w.shape)} and "
                         f"{tuple(bias_grad.shape)}")
    w = torch.cat([w, w.new_zeros(1, d)])
    b = torch.cat([b, b.new_zeros(1)])
    dw, db = w[:-1] - w[1:], b[:-1] - b[1:]
    largest = float(db.abs().max())
    if largest == 0.0:
        return torch.empty((0, *shape), dtype=weight_grad.dtype)
    keep = db.abs() > float(min_bias_gap) * largest
    if limit is not None and int(keep.sum()) > max(int(limit), 0):
        top = torch.topk(torch.where(keep, db.abs(), torch.zeros_like(db)), max(int(limit), 0)).indices
        keep = torch.zeros_like(keep)
        keep[top] = True
    images = (dw[keep] / db[keep, None]).clamp(float(value_range[0]), float(value_range[1]))
    return images.reshape(-1, *shape).to(weight_grad.dtype if weight_grad.is_floating_point() else torch.float32)
