"""Per-pixel attribution maps for a trained classifier, batched and bounded in memory on CPU.

Every method answers "which pixels made the model score ``target``?" and
returns one ``(B, H, W)`` float32 map per image on the CPU:

* ``integrated_gradients``: Captum ``IntegratedGradients`` from a baseline
  image to the input (``n_steps`` Gauss-Legendre points). Attributions sum
  to ``f(x) - f(baseline)`` for the target logit (completeness), which
  :func:`ig_completeness_gap` checks in plain torch. Signed.
* ``gradcam``: Captum ``LayerGradCam`` on the last spatial layer
  (:func:`interpret.targets.gradcam_layer`), ReLU'd and upsampled
  bilinearly to the image. ViTs use a token-grid Grad-CAM implemented here
  (Captum's assumes ``(B, C, h, w)`` layers). Non-negative, coarse.
* ``occlusion``: Captum ``Occlusion``: the drop of the target logit when a
  square window (``max(2, H // 7)`` px, stride half the window) is replaced
  by the baseline. Signed; model-agnostic but slow.
* ``smoothgrad``: Captum ``NoiseTunnel(Saliency)``: the mean absolute
  input gradient over ``nt_samples`` noisy copies (Gaussian, standard
  deviation 0.15 x the input range). Non-negative.
* ``deeplift`` (extra, not in :data:`METHODS`): Captum ``DeepLift``, only
  for models whose nonlinearities Captum's rescale rule supports; refused
  for GELU/SiLU models (see :func:`interpret.targets.uses_smooth_nonlinearity`).

Pixel methods are summed over channels. The *baseline* ("absence of
signal") is given in the model's input range: splitfl feeds images in
[-1, 1], so the default ``"zero"`` is mid-grey and ``"black"`` is -1 (the
darkest value, i.e. ``value_range[0]``); a float or an image tensor also works.

The model is put in ``eval()`` for the duration (BatchNorm must use its
running statistics, dropout must be off, or maps change from batch to batch)
and every module's train/eval flag is restored afterwards.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import (
    DeepLift,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from tqdm.auto import tqdm

from interpret.options import METHODS

from .targets import gradcam_layer, smooth_nonlinearities, vit_token_layout

__all__ = [
    "DEFAULT_VALUE_RANGE",
    "EXTRA_METHODS",
    "METHODS",
    "Baseline",
    "Target",
    "attribute",
    "attribute_all",
    "baseline_tensor",
    "check_images",
    "eval_mode",
    "ig_completeness_gap",
    "model_device",
    "num_outputs",
    "resolve_target",
]

EXTRA_METHODS: tuple[str, ...] = ("deeplift",)
# splitfl's datasets serve images normalised with mean 0.5, std 0.5.
DEFAULT_VALUE_RANGE: tuple[float, float] = (-1.0, 1.0)

Baseline = Union[str, float, torch.Tensor]
Target = Union[int, Sequence[int], torch.Tensor]

# Per-method options and their defaults; anything else passed as **opts is an error.
_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {
        "baseline": "zero",
        "n_steps": 32,
        # (image, step) pairs per forward/backward. IG on CPU needs this: B images x n_steps at
        # once would hold B*n_steps activations for the backward pass.
        "internal_batch_size": 64,
        "integration": "gausslegendre",
    },
    "gradcam": {"layer": None},
    "occlusion": {"baseline": "zero", "window": None, "stride": None, "perturbations_per_eval": None},
    "smoothgrad": {"nt_samples": 16, "noise_fraction": 0.15, "nt_samples_batch_size": None, "seed": 0},
    "deeplift": {"baseline": "zero"},
}
# Images per forward for occlusion / smoothgrad when their batching option is None.
_EVALS_PER_FORWARD = 64


# ---------------------------------------------------------------- small helpers


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a parameter-free model."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode, restoring each module's own flag afterwards.

    Module by module rather than ``model.train(was_training)``: a frozen
    split encoder stays in eval mode while its parent trains, and that mix
    must survive an attribution call.
    """
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in states:
            m.training = was


@contextlib.contextmanager
def _quiet_captum() -> Iterator[None]:
    """Silence Captum's per-call notices that are expected here (we set requires_grad deliberately)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
        warnings.filterwarnings("ignore", message=r"Setting forward, backward hooks and attributes on non-linear")
        yield


def check_images(images: torch.Tensor, where: str = "attribute") -> torch.Tensor:
    """Validate a ``(B, C, H, W)`` float image batch; returns it detached."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{where}: images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}.")
    if images.dim() == 3:
        raise ValueError(
            f"{where}: images has shape {tuple(images.shape)} (3-D); expected (B, C, H, W). "
            "For one image add the batch dimension: images.unsqueeze(0)."
        )
    if images.dim() != 4:
        raise ValueError(f"{where}: images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}.")
    if images.shape[0] == 0:
        raise ValueError(f"{where}: images is an empty batch (B = 0).")
    if not images.is_floating_point():
        raise ValueError(
            f"{where}: images must be float in the model's input range (e.g. [-1, 1]), got dtype {images.dtype}. "
            "Normalise them as the training data loader does."
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{where}: images contain NaN or infinite values.")
    return images.detach()


def _check_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not lo < hi:
        raise ValueError(f"value_range={value_range} must be (low, high) with low < high, e.g. (-1.0, 1.0).")
    return lo, hi


def num_outputs(model: nn.Module, images: torch.Tensor) -> int:
    """Number of logits, from one no-grad eval forward of ``images[:1]``.

    Raises:
        ValueError: the model does not return a ``(B, K)`` tensor of logits.
    """
    with eval_mode(model), torch.no_grad():
        out = model(images[:1].to(model_device(model)))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"The model must return logits of shape (B, num_classes); it returned {shape}.")
    return int(out.shape[1])


def resolve_target(target: Target, n_images: int, n_outputs: int, where: str = "attribute") -> torch.Tensor:
    """Target class per image as a ``(B,)`` long CPU tensor, checked against the number of logits.

    ``target`` is one class index for all images or one per image (tensor,
    list); for a binary task with two logits, 1 is the positive class.
    """
    if isinstance(target, bool):
        raise ValueError(f"{where}: target must be a class index (int), not a bool.")
    if isinstance(target, int):
        t = torch.full((n_images,), target, dtype=torch.long)
    else:
        t = torch.as_tensor(target)
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise ValueError(
                f"{where}: target must hold integer class indices, got dtype {t.dtype}. "
                "Pass e.g. logits.argmax(1) (the predicted class), not probabilities or one-hot labels."
            )
        t = t.long().reshape(-1) if t.dim() == 0 else t.long()
        if t.dim() != 1 or t.numel() not in (1, n_images):
            raise ValueError(
                f"{where}: target has shape {tuple(t.shape)}; expected an int or a ({n_images},) tensor, "
                "one class index per image."
            )
        t = t.expand(n_images).clone().cpu()
    bad = (t < 0) | (t >= n_outputs)
    if bad.any():
        raise ValueError(
            f"{where}: target {t[bad][:5].tolist()} out of range for a model with {n_outputs} output(s); "
            f"valid class indices are 0..{n_outputs - 1}."
        )
    return t


def baseline_tensor(baseline: Baseline, images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """The baseline as a ``(B, C, H, W)`` tensor like ``images``.

    ``"zero"`` = 0 (mid-grey for [-1, 1] images), ``"black"`` =
    ``value_range[0]``, a float = that value, a tensor = an image of shape
    ``(C, H, W)``, ``(1, C, H, W)`` or ``(B, C, H, W)``.
    """
    lo, _ = _check_value_range(value_range)
    if isinstance(baseline, str):
        values = {"zero": 0.0, "black": lo}
        if baseline not in values:
            raise ValueError(f"baseline={baseline!r} is unknown; use 'zero', 'black', a float or an image tensor.")
        return torch.full_like(images, values[baseline])
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(images, float(baseline))
    if isinstance(baseline, torch.Tensor):
        b = baseline.detach().to(images.dtype).cpu()
        if b.dim() == 3:
            b = b.unsqueeze(0)
        if b.dim() != 4 or b.shape[1:] != images.shape[1:] or b.shape[0] not in (1, images.shape[0]):
            raise ValueError(
                f"baseline tensor has shape {tuple(baseline.shape)}; expected (C, H, W), (1, C, H, W) or "
                f"(B, C, H, W) matching images {tuple(images.shape)}."
            )
        return b.expand_as(images).clone()
    raise ValueError(f"baseline must be 'zero', 'black', a float or a tensor, got {type(baseline).__name__}.")


def _check_opts(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    allowed = _OPTIONS[method]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for method {method!r}; it accepts {sorted(allowed)}."
        )
    return {**allowed, **opts}


def _check_method(method: str) -> None:
    if method not in METHODS + EXTRA_METHODS:
        raise ValueError(
            f"Unknown attribution method {method!r}; choose one of {list(METHODS)} "
            f"(or the extra {list(EXTRA_METHODS)})."
        )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


# ---------------------------------------------------------------- one chunk per method


def _ig_chunk(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, base: torch.Tensor, o: dict[str, Any]
) -> torch.Tensor:

    n_steps = _positive_int("n_steps", o["n_steps"])
    # Captum splits the B x n_steps evaluations into chunks of internal_batch_size, but never
    # fewer than the B images of one chunk (it warns and uses B).
    internal = max(_positive_int("internal_batch_size", o["internal_batch_size"]), x.shape[0])
    return IntegratedGradients(model).attribute(
        x, baselines=base, target=t, n_steps=n_steps, method=o["integration"], internal_batch_size=internal
    )


def _cnn_gradcam_chunk(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    cam = LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    if not isinstance(cam, torch.Tensor) or cam.dim() != 4:
        raise ValueError(
            f"Grad-CAM layer {type(layer).__name__} gave attributions of shape "
            f"{getattr(cam, 'shape', type(cam).__name__)}; it needs a (B, C, h, w) output."
        )
    return cam


def _vit_gradcam_chunk(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Grad-CAM on the patch-token grid of a ViT layer whose output is ``(B, N, D)``.

    weights = mean over patch tokens of d(score)/d(token) (one per feature
    d), cam = ReLU(sum_d w_d * act_d) per token, reshaped to the patch grid.
    Prefix tokens (class, register) are dropped: they have no position.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"ViT Grad-CAM: {type(module).__name__} returned {type(output).__name__}, not a tensor.")
        store["act"] = output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            # the input requires grad so the hooked activation is in the graph even for frozen weights
            logits = model(x.detach().requires_grad_(True))
            act = store["act"]
            score = logits.gather(1, t[:, None]).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    if act.dim() != 3:
        raise ValueError(f"ViT Grad-CAM: layer output has shape {tuple(act.shape)}; expected (B, tokens, dim).")
    prefix, (gh, gw) = vit_token_layout(model, (x.shape[-2], x.shape[-1]), act.shape[1])
    a, g = act.detach()[:, prefix:], grad[:, prefix:]
    weights = g.mean(dim=1, keepdim=True)  # (B, 1, D)
    cam = F.relu((a * weights).sum(dim=-1))  # (B, gh * gw)
    return cam.reshape(x.shape[0], 1, gh, gw)


def _occlusion_windows(h: int, w: int, o: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    win = o["window"]
    if win is None:
        win = (max(2, h // 7), max(2, w // 7))
    elif isinstance(win, int):
        win = (win, win)
    stride = o["stride"]
    if stride is None:
        stride = (max(1, win[0] // 2), max(1, win[1] // 2))
    elif isinstance(stride, int):
        stride = (stride, stride)
    win, stride = tuple(int(v) for v in win), tuple(int(v) for v in stride)
    if not (1 <= win[0] <= h and 1 <= win[1] <= w) or min(stride) < 1:
        raise ValueError(f"occlusion window {win} / stride {stride} must be >= 1 and fit {h}x{w} images.")
    return win, stride  # type: ignore[return-value]


def _occlusion_chunk(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, base: torch.Tensor, o: dict[str, Any]
) -> torch.Tensor:

    c, h, w = x.shape[1:]
    win, stride = _occlusion_windows(h, w, o)
    ppe = o["perturbations_per_eval"] or max(1, _EVALS_PER_FORWARD // x.shape[0])
    # the window spans all channels: a channel stride of c gives exactly one position along C
    return Occlusion(model).attribute(
        x,
        sliding_window_shapes=(c, *win),
        strides=(c, *stride),
        baselines=base,
        target=t,
        perturbations_per_eval=_positive_int("perturbations_per_eval", ppe),
    )


def _smoothgrad_chunk(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, o: dict[str, Any], value_range: tuple[float, float]
) -> torch.Tensor:

    n = _positive_int("nt_samples", o["nt_samples"])
    per = o["nt_samples_batch_size"] or max(1, _EVALS_PER_FORWARD // x.shape[0])
    stdev = float(o["noise_fraction"]) * (value_range[1] - value_range[0])  # Captum asserts a Python float
    return NoiseTunnel(Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=_positive_int("nt_samples_batch_size", per),
        stdevs=stdev, target=t, abs=True,
    )


def _deeplift_chunk(model: nn.Module, x: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    attr, delta = DeepLift(model).attribute(x, baselines=base, target=t, return_convergence_delta=True)
    with torch.no_grad():
        gap = (model(x) - model(base)).gather(1, t[:, None]).squeeze(1)
    if (delta.abs() > 1e-3 + 1e-2 * gap.abs()).any():
        raise ValueError(
            "DeepLift attributions do not sum to f(x) - f(baseline) (max gap "
            f"{delta.abs().max().item():.3g}): the model has a nonlinearity Captum's DeepLift does not handle "
            "(a functional activation, a reused module, x**2 ...). Use integrated_gradients."
        )
    return attr


def _check_deeplift(model: nn.Module) -> None:
    smooth = smooth_nonlinearities(model)
    if smooth:
        raise ValueError(
            f"DeepLift is refused for this model: it uses smooth nonlinearities ({', '.join(smooth[:3])}"
            f"{' ...' if len(smooth) > 3 else ''}). Captum 0.9.0's DeepLift has no rescale rule for GELU/SiLU "
            "and back-propagates plain gradients through them, so the maps would be silently wrong. "
            "Use integrated_gradients (same completeness property, exact for any differentiable model)."
        )


# ---------------------------------------------------------------- public API


def attribute(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    method: str,
    *,
    batch_size: int = 16,
    progress: bool = False,
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE,
    keep_channels: bool = False,
    **opts: Any,
) -> torch.Tensor:
    """Attribution maps of ``method`` for ``target``, one per image: ``(B, H, W)`` float32 on CPU.

    Args:
        model: a classifier returning ``(B, K)`` logits.
        images: ``(B, C, H, W)`` floats in the model's input range.
        target: class index for all images, or a ``(B,)`` tensor/list of
            indices (usually the predicted class; 1 = positive for a binary
            task with two logits).
        method: one of :data:`METHODS` (or ``"deeplift"``).
        batch_size: images per chunk; each chunk is attributed on the
            model's device and moved to the CPU.
        progress: show a tqdm bar over images.
        value_range: the model's input range; sets the ``"black"`` baseline
            and SmoothGrad's noise level.
        keep_channels: return ``(B, C, H, W)`` instead of summing channels
            (Grad-CAM: the map divided by C on every channel, so the sum is
            unchanged); used by the infidelity metric.
        **opts: method options (defaults): integrated_gradients
            ``baseline='zero', n_steps=32, internal_batch_size=64,
            integration='gausslegendre'``; gradcam ``layer=None`` (auto);
            occlusion ``baseline='zero', window=max(2, H//7), stride=window//2,
            perturbations_per_eval=None``; smoothgrad ``nt_samples=16,
            noise_fraction=0.15, nt_samples_batch_size=None, seed=0``;
            deeplift ``baseline='zero'``.

    Raises:
        ValueError: bad images, target, method or option, with what to change.
    """
    _check_method(method)
    o = _check_opts(method, opts)
    images = check_images(images)
    batch_size = _positive_int("batch_size", batch_size)
    value_range = _check_value_range(value_range)
    t_all = resolve_target(target, images.shape[0], num_outputs(model, images))
    device = model_device(model)
    base_all = baseline_tensor(o["baseline"], images, value_range) if "baseline" in o else None

    layer, kind = None, None
    if method == "gradcam":
        layer, kind = (o["layer"], None) if o["layer"] is not None else gradcam_layer(model, images)
        if kind is None:  # user-given layer: a ViT layer yields tokens, a CNN layer feature maps
            kind = "vit" if _layer_output_dim(model, layer, images) == 3 else "cnn"
    if method == "deeplift":
        _check_deeplift(model)

    b, c, h, w = images.shape
    out = torch.empty((b, c, h, w) if keep_channels else (b, h, w), dtype=torch.float32)
    rng_devices = [device] if device.type == "cuda" else []
    with eval_mode(model), _quiet_captum(), torch.random.fork_rng(devices=rng_devices):
        if method == "smoothgrad":
            torch.manual_seed(int(o["seed"]))  # NoiseTunnel draws its noise from the global RNG
        with tqdm(total=b, desc=method, unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, b, batch_size):
                sl = slice(start, start + batch_size)
                x, t = images[sl].to(device), t_all[sl].to(device)
                base = base_all[sl].to(device) if base_all is not None else None
                if method == "integrated_gradients":
                    a = _ig_chunk(model, x, t, base, o)
                elif method == "gradcam":
                    cam = (_vit_gradcam_chunk if kind == "vit" else _cnn_gradcam_chunk)(model, x, t, layer)
                    cam = F.interpolate(cam.float(), size=(h, w), mode="bilinear", align_corners=False)
                    a = F.relu(cam).expand(-1, c, -1, -1) / c
                elif method == "occlusion":
                    a = _occlusion_chunk(model, x, t, base, o)
                elif method == "smoothgrad":
                    a = _smoothgrad_chunk(model, x, t, o, value_range)
                else:
                    a = _deeplift_chunk(model, x, t, base)
                a = a.detach().float().cpu()
                out[sl] = a if keep_channels else a.sum(dim=1)
                bar.update(x.shape[0])
    return out


def _layer_output_dim(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> int:
    dims: list[int] = []
    handle = layer.register_forward_hook(lambda m, i, o: dims.append(o.dim()) if isinstance(o, torch.Tensor) else None)
    try:
        with eval_mode(model), torch.no_grad():
            model(images[:1].to(model_device(model)))
    finally:
        handle.remove()
    if not dims:
        raise ValueError("gradcam: the given layer did not run in the model's forward pass.")
    return dims[-1]


def attribute_all(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    methods: Sequence[str] = METHODS,
    *,
    batch_size: int = 16,
    progress: bool = False,
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE,
    options: Optional[dict[str, dict[str, Any]]] = None,
) -> dict[str, torch.Tensor]:
    """``{method: (B, H, W) map}`` for each method; ``options[method]`` holds that method's options."""
    for m in methods:
        _check_method(m)
    options = options or {}
    extra = sorted(set(options) - set(methods))
    if extra:
        raise ValueError(f"options given for {extra}, which are not among methods {list(methods)}.")
    return {
        m: attribute(model, images, target, m, batch_size=batch_size, progress=progress,
                     value_range=value_range, **options.get(m, {}))
        for m in methods
    }


def ig_completeness_gap(
    model: nn.Module,
    images: torch.Tensor,
    target: Target,
    maps: torch.Tensor,
    baseline: Baseline = "zero",
    value_range: tuple[float, float] = DEFAULT_VALUE_RANGE,
    batch_size: int = 64,
) -> torch.Tensor:
    """``sum(map) - (f(x) - f(baseline))`` per image for the target logit, in plain torch.

    Integrated Gradients is exact when this is 0 (completeness); a large gap
    means too few ``n_steps``. Compare with ``|f(x) - f(baseline)|``.
    """
    images = check_images(images, "ig_completeness_gap")
    t = resolve_target(target, images.shape[0], num_outputs(model, images), "ig_completeness_gap")
    base = baseline_tensor(baseline, images, value_range)
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"ig_completeness_gap: {maps.shape[0]} maps for {images.shape[0]} images.")
    device = model_device(model)
    diffs = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            ti = t[sl].to(device)[:, None]
            fx = model(images[sl].to(device)).gather(1, ti).squeeze(1)
            fb = model(base[sl].to(device)).gather(1, ti).squeeze(1)
            diffs.append((fx - fb).double().cpu())
    return maps.detach().reshape(maps.shape[0], -1).sum(1).double().cpu() - torch.cat(diffs)
