"""Trust checks: does an attribution map reflect what the model actually uses?

A map can look plausible and still say nothing about the model. Each check
here compares against a reference that has no knowledge of the model:

* :func:`deletion_insertion` (Petsiuk et al. 2018, RISE): delete the
  top-ranked pixels step by step (replace them by the baseline) and watch
  the target probability fall; insert them into a blurred copy and watch it
  rise. A faithful map gives a *lower* deletion AUC and a *higher*
  insertion AUC than random maps of the same images ("deletion AUC 0.21 vs
  random 0.48").
* :func:`infidelity_scores`: Captum's ``infidelity`` (Yeh et al. 2019):
  how well ``map . noise`` predicts the change of the target logit under
  Gaussian input noise. Lower is better; in squared logit units.
* :func:`sensitivity_scores`: Captum's ``sensitivity_max``: the largest
  relative change of the map under tiny uniform input noise. Lower is
  more stable.
* :func:`randomisation_check` (Adebayo et al. 2018): maps of a model with
  *re-initialised* weights must look clearly different from the trained
  model's (low rank correlation); if not, the method shows the image, not
  the model.

Probabilities follow splitfl's tasks: softmax over the logits for binary
(two logits), multiclass and ordinal tasks, sigmoid for multilabel tasks or
a single logit.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.metrics import infidelity, sensitivity_max
from tqdm.auto import tqdm

from .agreement import compare_maps
from .attributions import (
    DEFAULT_VALUE_RANGE,
    Baseline,
    Target,
    _quiet_captum,
    attribute,
    baseline_tensor,
    check_images,
    eval_mode,
    model_device,
    num_outputs,
    resolve_target,
)

__all__ = [
    "TASK_TYPES",
    "deletion_insertion",
    "gaussian_blur",
    "infidelity_scores",
    "randomisation_check",
    "randomise_model",
    "sensitivity_scores",
    "target_probability",
]

TASK_TYPES: tuple[str, ...] = ("binary", "multiclass", "ordinal", "multilabel")
ProbFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- probabilities and images


def target_probability(
    logits: torch.Tensor, target: torch.Tensor, task_type: str = "multiclass", prob_fn: Optional[ProbFn] = None
) -> torch.Tensor:
    """Probability of each row's target class, ``(B,)``.

    ``prob_fn`` (logits ``(B, K)`` -> probabilities ``(B, K)``) overrides
    ``task_type``; otherwise softmax for binary/multiclass/ordinal and
    sigmoid for multilabel or single-logit models.
    """
    if prob_fn is not None:
        probs = prob_fn(logits)
    elif task_type not in TASK_TYPES:
        raise ValueError(f"task_type={task_type!r} is unknown; use one of {list(TASK_TYPES)} or pass prob_fn.")
    elif task_type == "multilabel" or logits.shape[1] == 1:
        probs = torch.sigmoid(logits)
    else:
        probs = torch.softmax(logits, dim=1)
    return probs.gather(1, target.to(probs.device)[:, None]).squeeze(1)


def gaussian_blur(images: torch.Tensor, sigma: Optional[float] = None) -> torch.Tensor:
    """Gaussian-blurred copy of ``(B, C, H, W)`` images (reflect padding).

    Default ``sigma = H / 16`` px with a kernel of ``2 * round(2 sigma) + 1``
    (about H/4 wide): enough to wash out lesion-sized detail while keeping
    the global layout, so insertion starts from an image with the evidence
    removed but no out-of-distribution black.
    """
    h, w = images.shape[-2:]
    sigma = float(sigma) if sigma is not None else max(h, w) / 16.0
    if sigma <= 0:
        return images.clone()
    radius = max(1, int(round(2 * sigma)))
    radius = min(radius, h - 1, w - 1) if min(h, w) > 1 else 0
    if radius == 0:
        return images.clone()
    coords = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _check_maps(maps: torch.Tensor, images: torch.Tensor, where: str) -> torch.Tensor:
    b, _, h, w = images.shape
    if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != (b, h, w):
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{where}: maps must be a ({b}, {h}, {w}) tensor, one map per image; got {shape}.")
    if not torch.isfinite(maps).all():
        raise ValueError(f"{where}: maps contain NaN or infinite values.")
    return maps.detach().float().cpu()


# ---------------------------------------------------------------- deletion / insertion


def _curves(
    model: nn.Module,
    first: torch.Tensor,
    rest: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    counts: torch.Tensor,
    batch_size: int,
    prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    bar: Any,
) -> torch.Tensor:
    """Target probability at each step: the top ``counts[k]`` pixels from ``first``, the others from ``rest``.

    Deletion: first = baseline, rest = image. Insertion: first = image,
    rest = blurred image. All steps of a chunk of images go through the
    model together, ``batch_size`` images per forward.
    """
    b, c, h, w = first.shape
    s = counts.numel()
    device = model_device(model)
    order = torch.argsort(maps.reshape(b, -1), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w).expand(b, -1).contiguous())
    per_chunk = max(1, batch_size // s)
    out = torch.empty(b, s)
    for start in range(0, b, per_chunk):
        sl = slice(start, start + per_chunk)
        n = rank[sl].shape[0]
        mask = (rank[sl][:, None, :] < counts[None, :, None]).reshape(n, s, 1, h, w)
        steps = torch.where(mask, first[sl][:, None], rest[sl][:, None]).reshape(n * s, c, h, w)
        t = target[sl].repeat_interleave(s)
        probs = []
        with torch.no_grad():
            for i in range(0, n * s, batch_size):
                logits = model(steps[i:i + batch_size].to(device))
                probs.append(prob(logits, t[i:i + batch_size]).float().cpu())
        out[sl] = torch.cat(probs).reshape(n, s)
        bar.update(n)
    return out


def deletion_insertion(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    maps: torch.Tensor,
    *,
    task_type: str = "multiclass",
    prob_fn: Optional[ProbFn] = None,
    n_steps: int = 20,
    baseline: Baseline = "zero",
    insertion_start: str = "blur",
    blur_sigma: Optional[float] = None,
    rank_by: str = "value",
    n_random: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE,
) -> dict[str, Any]:
    """Deletion and insertion curves and AUCs of ``maps``, and of random maps as the reference.

    Pixels are ranked by map value (``rank_by='value'``: strongest evidence
    *for* the target first; ``'abs'``: largest magnitude first). At step k of
    ``n_steps`` the top ``k / n_steps`` of pixels (all channels) are
    replaced by ``baseline`` (deletion) or copied from the image into the
    start image (insertion; ``insertion_start='blur'`` = :func:`gaussian_blur`
    of the image, or ``'baseline'``). AUC = trapezoid of the target
    probability over the deleted/inserted fraction in [0, 1].

    The random reference ranks pixels by ``n_random`` uniform random maps
    (seeded ``torch.Generator``), AUCs averaged per image.

    Returns:
        ``fractions`` ``(S,)``; ``deletion_curve``, ``insertion_curve``
        ``(B, S)``; ``deletion_auc``, ``insertion_auc``,
        ``random_deletion_auc``, ``random_insertion_auc`` ``(B,)``; and
        ``summary``: their means plus ``deletion_beats_random`` /
        ``insertion_beats_random``, the share of images where the map is
        better than random. All numpy / floats.
    """
    where = "deletion_insertion"
    images = check_images(images, where).cpu()  # step images are built on the CPU, sent to the model in batches
    maps = _check_maps(maps, images, where)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"{where}: n_steps must be a positive int, got {n_steps!r}.")
    if rank_by not in ("value", "abs"):
        raise ValueError(f"{where}: rank_by={rank_by!r}; use 'value' or 'abs'.")
    if insertion_start not in ("blur", "baseline"):
        raise ValueError(f"{where}: insertion_start={insertion_start!r}; use 'blur' or 'baseline'.")
    if n_random < 0:
        raise ValueError(f"{where}: n_random must be >= 0, got {n_random}.")
    if batch_size < 1:
        raise ValueError(f"{where}: batch_size must be >= 1, got {batch_size}.")
    if prob_fn is None and task_type not in TASK_TYPES:
        raise ValueError(f"{where}: task_type={task_type!r} is unknown; use one of {list(TASK_TYPES)} or pass prob_fn.")
    t = resolve_target(target, images.shape[0], num_outputs(model, images), where)
    b, _, h, w = images.shape
    fractions = torch.linspace(0.0, 1.0, n_steps + 1)
    counts = torch.round(fractions * (h * w)).long()
    fill = baseline_tensor(baseline, images, value_range)
    start = gaussian_blur(images, blur_sigma) if insertion_start == "blur" else fill

    def prob(logits: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return target_probability(logits, tt, task_type, prob_fn)

    def run(ranking: torch.Tensor, bar: Any) -> tuple[torch.Tensor, torch.Tensor]:
        dele = _curves(model, fill, images, ranking, t, counts, batch_size, prob, bar)
        ins = _curves(model, images, start, ranking, t, counts, batch_size, prob, bar)
        return dele, ins

    def auc(curve: torch.Tensor) -> np.ndarray:
        return torch.trapezoid(curve.double(), fractions.double(), dim=1).numpy()

    gen = torch.Generator().manual_seed(int(seed))
    ranking = maps.abs() if rank_by == "abs" else maps
    # Ties (a flat Grad-CAM map, ReLU'd zeros) are broken at random, not in raster order: a map that ranks
    # nothing must score like a random map, not like "delete the top rows first".
    scale = ranking.flatten(1).abs().amax(1).clamp_min(1e-30)[:, None, None] * 1e-6
    ranking = ranking + scale * torch.rand(ranking.shape, generator=gen)
    with eval_mode(model), tqdm(total=2 * b * (1 + n_random), desc="deletion/insertion", unit="img",
                                disable=not progress, leave=False) as bar:
        dele, ins = run(ranking, bar)
        rand_del, rand_ins = [], []
        for _ in range(n_random):
            rd, ri = run(torch.rand(maps.shape, generator=gen), bar)
            rand_del.append(rd)
            rand_ins.append(ri)
    res: dict[str, Any] = {
        "fractions": fractions.numpy(),
        "deletion_curve": dele.numpy(),
        "insertion_curve": ins.numpy(),
        "deletion_auc": auc(dele),
        "insertion_auc": auc(ins),
    }
    if n_random:
        res["random_deletion_curve"] = torch.stack(rand_del).mean(0).numpy()
        res["random_insertion_curve"] = torch.stack(rand_ins).mean(0).numpy()
        res["random_deletion_auc"] = np.mean([auc(c) for c in rand_del], axis=0)
        res["random_insertion_auc"] = np.mean([auc(c) for c in rand_ins], axis=0)
    summary = {"deletion_auc": float(res["deletion_auc"].mean()), "insertion_auc": float(res["insertion_auc"].mean())}
    if n_random:
        summary.update(
            random_deletion_auc=float(res["random_deletion_auc"].mean()),
            random_insertion_auc=float(res["random_insertion_auc"].mean()),
            deletion_beats_random=float((res["deletion_auc"] < res["random_deletion_auc"]).mean()),
            insertion_beats_random=float((res["insertion_auc"] > res["random_insertion_auc"]).mean()),
        )
    res["summary"] = summary
    return res


# ---------------------------------------------------------------- Captum metrics


def _channel_maps(maps: torch.Tensor, images: torch.Tensor, where: str) -> torch.Tensor:
    """(B, H, W) maps spread evenly over channels, or (B, C, H, W) maps as they are."""
    if isinstance(maps, torch.Tensor) and maps.shape == images.shape:
        if not torch.isfinite(maps).all():
            raise ValueError(f"{where}: maps contain NaN or infinite values.")
        return maps.detach().float().cpu()
    m = _check_maps(maps, images, where)
    c = images.shape[1]
    return m[:, None].expand(-1, c, -1, -1) / c


def infidelity_scores(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    method: Optional[str] = None,
    *,
    maps: Optional[torch.Tensor] = None,
    noise_std: Optional[float] = None,
    n_perturb_samples: int = 8,
    normalize: bool = True,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE,
    **attr_opts: Any,
) -> np.ndarray:
    """Captum ``infidelity`` per image, ``(B,)``: lower = the map predicts the model's response better.

    Perturbations are Gaussian noise ``I`` with standard deviation
    ``noise_std`` (default 0.05 x the input range = 0.1 for [-1, 1] images);
    the score is ``E[(map . I - (f(x) - f(x - I)))^2]`` for the target logit.
    With ``normalize=True`` (default) the map is first rescaled by the best
    least-squares factor, so maps with arbitrary units (Grad-CAM,
    SmoothGrad) are comparable with IG; the score is then at most
    ``E[(f(x) - f(x - I))^2]``.

    Give either ``method`` (maps are computed per channel, with
    ``attr_opts``) or ``maps`` ((B, H, W), spread evenly over channels, or
    (B, C, H, W)).
    """

    where = "infidelity_scores"
    images = check_images(images, where).cpu()  # noise is drawn on the CPU; forward() moves batches to the model
    if (method is None) == (maps is None):
        raise ValueError(f"{where}: give exactly one of method (to compute maps) or maps.")
    if maps is not None and attr_opts:
        raise ValueError(f"{where}: attribution options {sorted(attr_opts)} only apply with method=..., not maps.")
    if n_perturb_samples < 1:
        raise ValueError(f"{where}: n_perturb_samples must be >= 1, got {n_perturb_samples}.")
    t = resolve_target(target, images.shape[0], num_outputs(model, images), where)
    if maps is None:
        attr = attribute(model, images, t, method, batch_size=batch_size, progress=progress,
                         value_range=value_range, keep_channels=True, **attr_opts)
    else:
        attr = _channel_maps(maps, images, where)
    std = float(noise_std) if noise_std is not None else 0.05 * (value_range[1] - value_range[0])
    if std <= 0:
        raise ValueError(f"{where}: noise_std must be > 0, got {std}.")
    device = model_device(model)
    gen = torch.Generator().manual_seed(int(seed))

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(inputs.shape, generator=gen, dtype=inputs.dtype) * std
        return noise, inputs - noise  # Captum compares map . I with f(x) - f(x - I)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device)).float().cpu()

    out = []
    per_call = max(1, batch_size)
    with eval_mode(model), _quiet_captum(), tqdm(total=images.shape[0], desc="infidelity", unit="img",
                                                 disable=not progress, leave=False) as bar:
        for start in range(0, images.shape[0], per_call):
            sl = slice(start, start + per_call)
            x = images[sl].float()
            n = x.shape[0]
            max_examples = min(n * n_perturb_samples, max(n, 4 * batch_size))
            out.append(infidelity(forward, perturb, x, attr[sl], target=t[sl], n_perturb_samples=n_perturb_samples,
                                  max_examples_per_batch=max_examples, normalize=normalize))
            bar.update(n)
    return torch.cat(out).double().numpy()


def sensitivity_scores(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    method: str,
    *,
    perturb_radius: Optional[float] = None,
    n_perturb_samples: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE,
    **attr_opts: Any,
) -> np.ndarray:
    """Captum ``sensitivity_max`` per image, ``(B,)``: the largest ``||map(x') - map(x)|| / ||map(x)||``.

    The maximum is over ``n_perturb_samples`` perturbed copies ``x'``.

    ``x'`` = ``x`` + uniform noise in ``[-perturb_radius, perturb_radius]``
    (default 0.01 x the input range = 0.02 for [-1, 1] images, Captum's own
    default radius). The maps are the channel-summed ``(B, H, W)`` maps of
    :func:`~interpret.attributions.attribute` with ``attr_opts``. Each
    perturbed copy re-runs the method, so this costs ``n_perturb_samples + 1``
    attributions; SmoothGrad's own sampling noise adds to its score.
    """

    where = "sensitivity_scores"
    images = check_images(images, where).cpu()  # perturbations are drawn on the CPU; attribute() moves batches
    if n_perturb_samples < 1:
        raise ValueError(f"{where}: n_perturb_samples must be >= 1, got {n_perturb_samples}.")
    t = resolve_target(target, images.shape[0], num_outputs(model, images), where)
    radius = float(perturb_radius) if perturb_radius is not None else 0.01 * (value_range[1] - value_range[0])
    gen = torch.Generator().manual_seed(int(seed))

    def perturb(inputs: torch.Tensor, r: float) -> torch.Tensor:
        return inputs + (torch.rand(inputs.shape, generator=gen, dtype=inputs.dtype) * 2 - 1) * r

    def explain(inputs: Any, target: torch.Tensor) -> Any:
        # Captum 0.9.0 calls this with a 1-tuple for the unperturbed images and a bare tensor for the
        # perturbed ones, and iterates over the first result as a tuple of tensors: answer in kind
        # (a bare tensor there would be iterated image by image and fail on shapes). It also runs
        # under no_grad, so gradient methods need grad switched back on.
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        with torch.enable_grad():
            maps = attribute(model, x, target, method, batch_size=batch_size, value_range=value_range, **attr_opts)
        return (maps,) if isinstance(inputs, tuple) else maps

    out = []
    with tqdm(total=images.shape[0], desc="sensitivity", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, images.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            x = images[sl].float()
            out.append(sensitivity_max(explain, x, perturb_func=perturb, perturb_radius=radius,
                                       n_perturb_samples=n_perturb_samples, target=t[sl]))
            bar.update(x.shape[0])
    return torch.cat(out).double().numpy()


# ---------------------------------------------------------------- model-parameter randomisation


def randomise_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every parameter re-initialised (seeded); ``model`` is untouched.

    Modules with ``reset_parameters()`` (conv, linear, norm layers, which
    also reset BatchNorm running statistics) use it; any parameter not
    owned by such a module (ViT class token, position embedding ...) is
    drawn from N(0, 0.02^2).
    """
    rnd = copy.deepcopy(model)
    device = model_device(rnd)
    covered: set[int] = set()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(int(seed))
        for m in rnd.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                try:
                    reset()
                except TypeError:  # a reset_parameters that needs arguments: fall back to normal init
                    continue
                covered.update(id(p) for p in m.parameters(recurse=False))
        for p in rnd.parameters():
            if id(p) not in covered:
                nn.init.normal_(p, std=0.02)
    return rnd


def _flat_maps(maps: torch.Tensor) -> np.ndarray:
    flat = maps.reshape(maps.shape[0], -1)
    return (flat.amax(dim=1) == flat.amin(dim=1)).numpy()


def randomisation_check(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    method: str,
    *,
    maps: Optional[torch.Tensor] = None,
    seed: int = 0,
    top_fraction: float = 0.1,
    batch_size: int = 16,
    progress: bool = False,
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE,
    **attr_opts: Any,
) -> dict[str, Any]:
    """Model-parameter randomisation test: trained vs fully re-initialised model, same images and targets.

    Compares ``|map|`` of the trained model (``maps`` if given, else
    computed with ``method``) and of :func:`randomise_model` per image
    (:func:`interpret.agreement.compare_maps`). A method that explains the
    model gives clearly dissimilar maps: ``mean_abs_spearman`` well below 1
    (the same model twice gives exactly 1). Methods that multiply by the
    input (Integrated Gradients with ``(x - baseline)``) keep some image
    structure and correlate more than gradient-only ones.

    A randomised map that is constant (e.g. Grad-CAM ReLU'd to all zeros)
    while the trained one is not counts as rho = 0 (``n_randomised_flat``
    says how often); rho stays NaN only when the trained map itself is flat.

    Returns:
        the :func:`compare_maps` dict (``spearman``, ``top_overlap`` ...)
        plus ``mean_abs_spearman``, ``n_randomised_flat`` and the two map
        sets ``maps`` and ``randomised_maps`` ((B, H, W) tensors, for the
        report's figures).
    """
    where = "randomisation_check"
    images = check_images(images, where)
    t = resolve_target(target, images.shape[0], num_outputs(model, images), where)
    kw = dict(batch_size=batch_size, progress=progress, value_range=value_range, **attr_opts)
    trained = _check_maps(maps, images, where) if maps is not None else attribute(model, images, t, method, **kw)
    rnd_maps = attribute(randomise_model(model, seed), images, t, method, **kw)
    res = compare_maps(trained.abs(), rnd_maps.abs(), top_fraction)
    rho = res["spearman"]
    # A randomised map that went flat (e.g. an all-zero Grad-CAM) shares no ranking with a
    # non-flat trained map: the explanation was destroyed, which is a pass, not an unknown.
    flat_rnd = _flat_maps(rnd_maps) & ~_flat_maps(trained)
    rho[flat_rnd] = 0.0
    res["n_randomised_flat"] = int(flat_rnd.sum())
    defined = ~np.isnan(rho)
    res["n_undefined"] = int((~defined).sum())
    res["mean_spearman"] = float(rho[defined].mean()) if defined.any() else math.nan
    res["mean_abs_spearman"] = float(np.abs(rho[defined]).mean()) if defined.any() else math.nan
    res["maps"] = trained
    res["randomised_maps"] = rnd_maps
    return res
