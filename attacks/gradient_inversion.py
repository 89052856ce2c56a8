"""Gradient-inversion attacks: rebuild training images from an observed model update.

Three attacks, from weakest prior to strongest:

* ``dlg`` - Deep Leakage from Gradients (Zhu et al. 2019): L-BFGS on a dummy
  image *and* a soft dummy label to minimise the L2 distance between the
  dummy's gradient and the observed one.
* ``idlg`` - improved DLG (Zhao et al. 2020): read the labels off the last
  layer's gradient first (``infer_labels``), then run DLG with them fixed.
* ``inverting_gradients`` - Geiping et al. 2020: cosine gradient-matching
  loss plus a total-variation prior, Adam on the *sign* of the image gradient
  with step decay, images boxed to the valid range, best of several restarts;
  labels from ``infer_labels``.

What the attacker observes is either a single-step gradient or, in FedAvg, a
parameter difference after ``k`` local SGD steps with learning rate ``eta`` on
the same batch. ``gradients_from_update`` turns the latter into a pseudo
gradient ``(w_before - w_after) / (k * eta)`` - exact for k = 1, and for k > 1
the average of the k gradients along the local trajectory, which the attack
then treats as one gradient at ``w_before`` (an approximation that degrades as
``k * eta`` grows; Geiping et al. unroll the local steps instead).

The model passed in must hold the weights the gradient was taken at
(``w_before``). Everything runs on the model's device, seeded, and shows a
tqdm bar for the optimisation loop.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from attacks.metrics import DEFAULT_VALUE_RANGE, ValueRange

Grads = list[torch.Tensor]


@dataclass
class InversionResult:
    """Reconstructed batch in the model's input range, labels used, and the loss trace of the kept run."""

    images: torch.Tensor  # (B, C, H, W); DLG/iDLG are unconstrained, metrics clamp to the valid range
    labels: torch.Tensor  # (B,) long; DLG: argmax of the optimised soft label
    loss_history: list[float]
    method: str
    final_loss: float
    restart_losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- observed update


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def model_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, create_graph: bool = False) -> Grads:
    """Gradient of the mean cross-entropy w.r.t. the trainable parameters (labels: class ids or soft rows).

    This is what a hospital sends for one SGD step on ``images``; attacks call
    it with ``create_graph=True`` on their dummies.
    """
    loss = F.cross_entropy(model(images), labels)
    return list(torch.autograd.grad(loss, _params(model), create_graph=create_graph))


def local_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, local_steps: int, lr: float) -> Grads:
    """Simulate a FedAvg client: ``local_steps`` SGD steps on one batch; returns ``w_before - w_after``.

    The model is left unchanged (the steps run on detached copies of the weights).
    """
    params = _params(model)
    before = [p.detach().clone() for p in params]
    try:
        for _ in range(int(local_steps)):
            grads = model_gradients(model, images, labels)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(lr * g)
        return [b - p.detach() for b, p in zip(before, params)]
    finally:
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)


def gradients_from_update(param_delta: Sequence[torch.Tensor], local_steps: int = 1, lr: float = 1.0) -> Grads:
    """Pseudo gradient ``(w_before - w_after) / (k * lr)`` from a FedAvg update (see module docstring)."""
    if int(local_steps) < 1 or not lr > 0:
        raise ValueError(f"need local_steps >= 1 and lr > 0, got {local_steps!r}, {lr!r}")
    scale = 1.0 / (int(local_steps) * float(lr))
    return [d.detach() * scale for d in param_delta]


def add_gaussian_noise(grads: Sequence[torch.Tensor], level: float, seed: int = 0) -> Grads:
    """Add N(0, (level * ||g||_2)^2) to every coordinate, like DP-SGD with clip norm ||g|| and multiplier ``level``."""
    if level <= 0:
        return [g.detach().clone() for g in grads]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    norm = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads)).item()
    return [g.detach() + (level * norm) * torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device)
            for g in grads]


def _check_grads(model: nn.Module, grads: Sequence[torch.Tensor]) -> Grads:
    params = _params(model)
    if len(grads) != len(params) or any(g.shape != p.shape for g, p in zip(grads, params)):
        raise ValueError(
            f"observed gradients do not fit the model: got {[tuple(g.shape) for g in grads]}, "
            f"model has {[tuple(p.shape) for p in params]}"
        )
    return [g.detach().to(p.device, p.dtype) for g, p in zip(grads, params)]


def _last_weight_grad(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The final linear layer's weight gradient: the last 2-D tensor, shape (K, features)."""
    for g in reversed(grads):
        if g.ndim == 2:
            return g
    raise ValueError("label inference needs a final linear layer (no 2-D weight gradient found)")


# --------------------------------------------------------------------------- labels


def infer_labels(grads: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Labels from the sign of the last layer's weight gradient (iDLG), sorted ascending.

    For cross-entropy, row ``c`` of that gradient is ``mean_i (p_ic - y_ic) h_i``
    with non-negative features ``h_i`` (sigmoid/ReLU), so its row sum is
    negative exactly for classes present in the batch. Batch 1 is exact
    (iDLG). For larger batches every negative class gets one label, and the
    remaining counts follow the usual extension (LLG, Wainakh et al. 2022): each
    sample of class ``c`` lowers the row sum by roughly the same "impact"
    ``m = -sum(negative row sums) / B``, so labels are handed out greedily to
    the most negative row, adding ``m`` back each time.
    """
    b = int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    s = _last_weight_grad(grads).detach().double().sum(dim=1)
    if b == 1:
        return s.argmin().reshape(1).long().cpu()
    neg = s < 0
    impact = float(-s[neg].sum() / b) if bool(neg.any()) else float(s.abs().mean())
    remaining = s.clone()
    labels = []
    for _ in range(b):
        c = int(remaining.argmin())
        labels.append(c)
        remaining[c] += impact
    return torch.tensor(sorted(labels), dtype=torch.long)


# --------------------------------------------------------------------------- losses


def l2_gradient_loss(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """DLG's objective: squared L2 distance summed over all parameter tensors."""
    return sum(((d - t) ** 2).sum() for d, t in zip(dummy, target))


def cosine_gradient_loss(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """Geiping et al.'s objective: 1 - cosine similarity of the flattened full gradients (scale invariant)."""
    dot = sum((d * t).sum() for d, t in zip(dummy, target))
    dn = sum((d * d).sum() for d in dummy)
    tn = sum((t * t).sum() for t in target)
    return 1.0 - dot / (dn.sqrt() * tn.sqrt() + 1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of horizontal and vertical neighbours (natural-image prior)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


# --------------------------------------------------------------------------- attacks


def _dummy(shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=dtype).to(device).requires_grad_(True)


def _image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
    return shape  # type: ignore[return-value]


def _dlg_closures(model: nn.Module, target: Grads, x: torch.Tensor, y_fixed: torch.Tensor | None,
                  y_logits: torch.Tensor | None):
    """DLG's objective (L2 gradient distance) and the L-BFGS closure that fills the dummies' .grad."""
    variables = [x] if y_logits is None else [x, y_logits]

    def objective() -> torch.Tensor:
        y = y_fixed if y_logits is None else F.softmax(y_logits, dim=-1)
        return l2_gradient_loss(model_gradients(model, x, y, create_graph=True), target)

    def closure() -> torch.Tensor:
        for v in variables:
            v.grad = None
        loss = objective()
        for v, g in zip(variables, torch.autograd.grad(loss, variables)):
            v.grad = g
        return loss

    return objective, closure


def dlg(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    batch_size: int,
    image_shape: Sequence[int],
    labels: torch.Tensor | None = None,
    iterations: int = 300,
    lr: float = 1.0,
    restarts: int = 4,
    tol: float = 1e-6,
    patience: int = 10,
    give_up_ratio: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> InversionResult:
    """DLG: L-BFGS on dummy images (and soft labels unless ``labels`` is given) to match gradients in L2.

    ``iterations`` counts L-BFGS steps (each up to 20 evaluations) per start.
    DLG is sensitive to its random start (a bad one stalls in a local minimum
    or diverges to NaN), so up to ``restarts`` starts are tried: a start ends
    when the loss falls below ``tol`` times the observed gradient's squared
    norm (converged: no further start is needed), has not improved by 1%
    for ``patience`` steps, or is still above ``give_up_ratio`` times its
    first loss after ``patience`` steps (good starts drop by orders of
    magnitude within a few steps); the lowest-loss dummy seen overall is kept.
    """
    target = _check_grads(model, gradients)
    shape = _image_shape(image_shape)
    num_classes = _last_weight_grad(target).shape[0]
    p0 = _params(model)[0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    fixed = labels is not None
    y_fixed = labels.to(p0.device).long() if fixed else None
    done = float(tol) * float(sum((t.double() ** 2).sum() for t in target))
    name = "idlg" if fixed else "dlg"
    best: tuple[float, torch.Tensor, torch.Tensor | None, list[float]] = (math.inf, torch.empty(0), None, [])
    restart_losses: list[float] = []
    for r in range(max(1, int(restarts))):
        x = _dummy((int(batch_size), *shape), gen, p0.device, p0.dtype)
        y_logits = None if fixed else _dummy((int(batch_size), num_classes), gen, p0.device, p0.dtype)
        variables = [x] if fixed else [x, y_logits]
        opt = torch.optim.LBFGS(variables, lr=lr)
        objective, closure = _dlg_closures(model, target, x, y_fixed, y_logits)

        history: list[float] = []
        run_best, since = math.inf, 0
        bar = tqdm(range(int(iterations)), desc=f"{name} start {r + 1}", disable=not progress, leave=False)
        for _ in bar:
            opt.step(closure)
            loss = float(objective().detach())
            history.append(loss)
            if not math.isfinite(loss):
                break
            if loss < best[0]:
                best = (loss, x.detach().clone(), None if fixed else y_logits.detach().clone(), history)
            since = 0 if loss < 0.99 * run_best else since + 1
            run_best = min(run_best, loss)
            bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
            stuck = len(history) >= patience and loss > give_up_ratio * history[0]
            if loss <= done or since >= patience or stuck:
                break
        restart_losses.append(run_best)
        if best[0] <= done:
            break
    if best[2] is None and not fixed:  # every start diverged at once: return the last dummy
        best = (math.inf, x.detach().clone(), y_logits.detach().clone(), history)
    out_labels = y_fixed.cpu() if fixed else best[2].argmax(dim=-1).cpu()
    return InversionResult(best[1], out_labels, best[3], name, best[0], restart_losses)


def idlg(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    batch_size: int,
    image_shape: Sequence[int],
    **dlg_kwargs,
) -> InversionResult:
    """iDLG: labels from ``infer_labels``, then DLG (same keyword arguments) on the images alone."""
    labels = infer_labels(gradients, batch_size)
    return dlg(model, gradients, batch_size, image_shape, labels=labels, **dlg_kwargs)


def inverting_gradients(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    batch_size: int,
    image_shape: Sequence[int],
    labels: torch.Tensor | None = None,
    iterations: int = 2000,
    lr: float = 0.1,
    tv_weight: float = 1e-3,
    restarts: int = 1,
    value_range: ValueRange = DEFAULT_VALUE_RANGE,
    seed: int = 0,
    progress: bool = True,
) -> InversionResult:
    """Inverting Gradients: cosine loss + ``tv_weight`` * TV, signed Adam, lr x0.1 at 3/8, 5/8, 7/8.

    Images are clamped to ``value_range`` after every step; of ``restarts``
    independent starts the one with the lowest final matching loss is kept.
    """
    target = _check_grads(model, gradients)
    shape = _image_shape(image_shape)
    lo, hi = float(value_range[0]), float(value_range[1])
    y = (infer_labels(target, batch_size) if labels is None else labels.long()).to(_params(model)[0].device)
    p0 = _params(model)[0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    iters = int(iterations)
    milestones = [int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    best: tuple[float, torch.Tensor, list[float]] = (math.inf, torch.empty(0), [])
    restart_losses: list[float] = []
    for r in range(max(1, int(restarts))):
        x = _dummy((int(batch_size), *shape), gen, p0.device, p0.dtype)
        with torch.no_grad():
            x.clamp_(lo, hi)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        history: list[float] = []
        bar = tqdm(range(iters), desc=f"IG restart {r + 1}", disable=not progress, leave=False)
        for it in bar:
            opt.zero_grad()
            match = cosine_gradient_loss(model_gradients(model, x, y, create_graph=True), target)
            loss = match + tv_weight * total_variation(x)
            (grad_x,) = torch.autograd.grad(loss, [x])
            x.grad = grad_x.sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            history.append(float(loss.detach()))
            if it % 50 == 0:
                bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
        final = float(cosine_gradient_loss(model_gradients(model, x.detach(), y), target))
        restart_losses.append(final)
        if final < best[0]:
            best = (final, x.detach().clone(), history)
    return InversionResult(best[1], y.cpu(), best[2], "ig", best[0], restart_losses)


METHODS = {"dlg": dlg, "idlg": idlg, "ig": inverting_gradients}


def reconstruct(
    model: nn.Module,
    image_shape: Sequence[int],
    batch_size: int,
    method: str = "ig",
    gradients: Sequence[torch.Tensor] | None = None,
    param_delta: Sequence[torch.Tensor] | None = None,
    local_steps: int = 1,
    lr: float | None = None,
    **attack_kwargs,
) -> InversionResult:
    """Run ``method`` on what the attacker observed: ``gradients`` or a FedAvg ``param_delta``.

    A ``param_delta`` (``w_before - w_after``) needs ``local_steps`` and the
    clients' ``lr`` and is turned into a pseudo gradient by
    ``gradients_from_update``; ``model`` must hold ``w_before``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attack {method!r}; choose one of {sorted(METHODS)}")
    if (gradients is None) == (param_delta is None):
        raise ValueError("pass exactly one of gradients= (single step) or param_delta= (local update)")
    if param_delta is not None:
        if lr is None:
            raise ValueError("param_delta needs the clients' learning rate lr=")
        gradients = gradients_from_update(param_delta, local_steps, lr)
    return METHODS[method](model, list(gradients), batch_size, image_shape, **attack_kwargs)
