"""Load foundation-model weights from a local file into a (fine-tuning) model.

Fine-tuning a foundation model on a medical task almost never matches the
checkpoint exactly: the classifier has a different number of classes, the
images are grey-scale while the weights are RGB, a small-input stem replaced
the ImageNet one. Those expected differences are resolved the way timm does
for its own pretrained weights and *reported*; anything else (the wrong
architecture, a corrupt file) is an error that names the key or path.

Public foundation models (RETFound, UNI, DINOv2, Phikon) are released in their
own key layouts; :mod:`splitfl.models.formats` converts them to timm names
first (``model.pretrained_format``), and the report records that mapping.

Weights are never downloaded: the file must be on disk. ``torch.load`` runs
with ``weights_only=True``, so a checkpoint cannot execute code.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from timm.layers import resample_patch_embed
from timm.models import adapt_input_conv, load_state_dict

from .factory import ModelError
from .formats import FOUNDATION_FORMATS, KeyMapping, convert_checkpoint, fit_vit_checkpoint
from .split import SplitModel

__all__ = ["CHECKPOINT_SUFFIXES", "LoadReport", "load_pretrained"]

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Wrapper prefixes stripped when *every* key carries one (DDP, torch.compile, Lightning's self.model).
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "model.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each checkpoint entry.

    Attributes:
        path: the checkpoint file.
        loaded_keys: model keys filled from the checkpoint (including adapted ones).
        missing_keys: model keys the checkpoint does not have (left as initialised).
        unexpected_keys: checkpoint keys the model does not have (ignored).
        dropped_keys: ``(key, reason)`` for checkpoint entries deliberately not
            loaded, e.g. a classifier sized for another number of classes.
        adapted_keys: ``(key, how)`` for entries converted to fit, e.g. RGB
            first-conv weights summed to one input channel.
        format: the checkpoint layout used (``model.pretrained_format``, or
            the one detected from the keys), see :mod:`splitfl.models.formats`.
        mapping: which checkpoint key(s) each model key came from, and the
            entries the format drops on purpose (also in ``dropped_keys``).
    """

    path: str
    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    dropped_keys: list[tuple[str, str]] = field(default_factory=list)
    adapted_keys: list[tuple[str, str]] = field(default_factory=list)
    format: str = "timm"
    mapping: Optional[KeyMapping] = None

    @property
    def renamed(self) -> list[tuple[str, str]]:
        """``(checkpoint key(s), model key)`` for tensors the format renamed or combined."""
        return self.mapping.renamed if self.mapping is not None else []

    def __str__(self) -> str:
        how = ", detected from keys" if self.mapping is not None and self.mapping.detected else ""
        lines = [
            f"Loaded {len(self.loaded_keys)} tensors from {self.path} (format: {self.format}{how})",
            f"  adapted: {len(self.adapted_keys)}, dropped: {len(self.dropped_keys)}, "
            f"missing (left at init): {len(self.missing_keys)}, unexpected (ignored): {len(self.unexpected_keys)}",
        ]
        if self.format != "timm":
            renamed = [f"{src} -> {dst}" for src, dst in self.renamed]
            lines += _listing(f"renamed {len(renamed)} keys to timm names", renamed, limit=6) or [
                "  renamed: none (the checkpoint's encoder keys already are timm names)"
            ]
        lines += [f"  adapted {k}: {how}" for k, how in self.adapted_keys]
        for why, keys in _by_reason(self.dropped_keys).items():
            lines.append(f"  dropped {_shown(keys, limit=6)}: {why}")
        lines += _listing("missing", self.missing_keys)
        lines += _listing("unexpected", self.unexpected_keys)
        return "\n".join(lines)


def _listing(label: str, keys: list[str], limit: int = 10) -> list[str]:
    return [f"  {label}: {_shown(keys, limit)}"] if keys else []


def _shown(keys: list[str], limit: int) -> str:
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _by_reason(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Group ``(key, reason)`` pairs by reason, in first-seen order (an MAE decoder is ~100 keys, one reason)."""
    groups: dict[str, list[str]] = {}
    for key, why in pairs:
        groups.setdefault(why, []).append(key)
    return groups


def load_pretrained(model: nn.Module, path: str, strict: bool = False, fmt: str = "auto") -> LoadReport:
    """Load a local checkpoint into ``model`` in place and report what happened.

    Accepts ``.pth/.pt/.bin/.ckpt`` (``torch.load``, weights only) and
    ``.safetensors``; the state dict may be nested under ``'state_dict_ema'``,
    ``'model_ema'``, ``'state_dict'`` or ``'model'`` (timm's
    :func:`~timm.models.load_state_dict` picks it, preferring EMA weights) and
    prefixed by ``module.``/``_orig_mod.``/``model.``.

    The keys are then converted from the file's layout (``fmt``: RETFound,
    UNI, DINOv2, Phikon, or detected with ``auto``) to timm ViT names, and
    fitted to the model (LayerScale/register tokens checked, position
    embeddings resampled to the model's grid), see
    :mod:`splitfl.models.formats`. Then, per key:

    * classifier with another shape (other ``num_classes``): dropped, reported;
    * first conv with other input channels: adapted with timm's
      :func:`~timm.models.adapt_input_conv` (1 channel = sum over RGB);
    * first conv with another kernel: patchify stems (kernel == stride) are
      resampled with :func:`~timm.layers.resample_patch_embed`, others (a
      small-input ResNet stem) are dropped and reported;
    * any other shape mismatch: :class:`ModelError`.

    For the ``timm`` format, architecture-specific key conversions (e.g. ViT
    position-embedding resampling, original ConvNeXt/CLIP layouts) use the
    timm model module's own ``checkpoint_filter_fn`` when it has one.

    Args:
        model: the model to fill, before :func:`~splitfl.models.split_model`.
        path: local checkpoint file.
        strict: also fail on missing or unexpected keys (the documented
            classifier/stem drops are still allowed, and so is a missing
            classifier for the foundation formats, which hold encoders only).
        fmt: the file's key layout, ``model.pretrained_format``: ``auto``,
            ``timm``, ``retfound``, ``uni``, ``dinov2`` or ``phikon``.

    Raises:
        ModelError: missing/unreadable file, not a state dict, a file not in
            the named format's layout, a LayerScale/register-token mismatch,
            a shape that cannot be adapted, more than half the model's keys
            missing, or (``strict``) any missing/unexpected key.
    """
    if isinstance(model, SplitModel):
        raise ModelError(
            f"load_pretrained({path!r}) got a SplitModel; load the checkpoint into the timm model *before* "
            "split_model(), so that encoder and head share the loaded weights (build_split_model does this)."
        )
    name = _arch_name(model)
    own = model.state_dict()
    state, mapping = convert_checkpoint(_strip_wrapper_prefixes(_read_state_dict(path), own), fmt, path=str(path))
    report = LoadReport(path=str(path), format=mapping.format, mapping=mapping)
    if mapping.format in FOUNDATION_FORMATS:
        report.dropped_keys.extend(mapping.dropped)
        report.adapted_keys.extend(fit_vit_checkpoint(state, model, mapping, str(path), name))
    else:
        state = _filter_for_arch(state, model)

    clf_keys = _classifier_keys(model)
    first_conv = _first_conv_weight(model)
    to_load: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        if key not in own:
            report.unexpected_keys.append(key)
            continue
        target = own[key]
        if value.shape == target.shape:
            to_load[key] = value
        elif key in clf_keys:
            report.dropped_keys.append(
                (key, f"classifier shape {tuple(value.shape)} != model {tuple(target.shape)} "
                      "(different num_classes); left at random init for fine-tuning")
            )
        elif key == first_conv:
            adapted = _adapt_first_conv(model, key, value, target, report)
            if adapted is not None:
                to_load[key] = adapted
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")

    if mismatched:
        shown = "; ".join(mismatched[:5]) + (f"; ... (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else "")
        raise ModelError(
            f"Checkpoint {path} does not fit {name}: {len(mismatched)} shape mismatch(es): {shown}. "
            "Did you pick the right model name (and size variant) for these weights?"
        )

    dropped = {k for k, _ in report.dropped_keys}
    report.missing_keys = [k for k in own if k not in to_load and k not in dropped]
    report.unexpected_keys.sort()
    if len(report.missing_keys) > len(own) / 2:
        raise ModelError(
            f"Checkpoint {path} does not fit {name}: {len(report.missing_keys)} of the model's {len(own)} "
            f"keys are missing (e.g. {', '.join(report.missing_keys[:3])}) and {len(report.unexpected_keys)} "
            f"checkpoint keys are unknown (e.g. {', '.join(report.unexpected_keys[:3])}). "
            "Did you pick the right model name?"
        )
    # encoder-only foundation checkpoints have no classifier to miss
    strict_missing = [k for k in report.missing_keys if mapping.format not in FOUNDATION_FORMATS or k not in clf_keys]
    if strict and (strict_missing or report.unexpected_keys):
        problems = _listing("missing", strict_missing) + _listing("unexpected", report.unexpected_keys)
        raise ModelError(
            f"strict loading of {path} into {name} failed:\n" + "\n".join(problems)
            + "\nUse strict=False to leave missing keys at init and ignore unexpected ones."
        )

    model.load_state_dict(to_load, strict=False)
    report.loaded_keys = list(to_load)
    return report


# ---------------------------------------------------------------- reading


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read the file and return its (un-nested, DDP-cleaned) tensor dict, or raise ModelError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(
            f"Checkpoint file not found: {path!r} (model.pretrained). Give the path of a local "
            f"{'/'.join(CHECKPOINT_SUFFIXES)} file; weights are never downloaded."
        )
    if not path.lower().endswith(CHECKPOINT_SUFFIXES):
        raise ModelError(
            f"Checkpoint {path!r} has an unsupported extension; use one of {', '.join(CHECKPOINT_SUFFIXES)}."
        )
    try:
        # timm: safetensors or torch.load(weights_only=True), un-nests state_dict_ema/model_ema/state_dict/model
        # and strips DDP/torch.compile prefixes.
        state = load_state_dict(path, use_ema=True, device="cpu", weights_only=True)
    except Exception as e:  # corrupt archive, pickle refused by weights_only, truncated file, ...
        hint = ""
        if "weights_only" in str(e):
            hint = (
                " If this is a training checkpoint you trust (e.g. RETFound/MAE with 'optimizer' and 'args' "
                "entries), extract its weights once and point model.pretrained at the result: python -c \"import "
                f"torch; ck = torch.load({path!r}, map_location='cpu', weights_only=False); "
                "torch.save(ck['model'], 'encoder_weights.pth')\""
            )
        raise ModelError(
            f"Could not read checkpoint {path!r}: {type(e).__name__}: {e}. The file is corrupt or not a "
            "PyTorch/safetensors checkpoint (pickled objects other than tensors are refused for safety)." + hint
        ) from None
    if not isinstance(state, dict) or not state:
        raise ModelError(f"Checkpoint {path!r} holds no state dict (got {type(state).__name__}).")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelError(
            f"Checkpoint {path!r} is not a state dict: entries {not_tensors[:5]} are not tensors. Expected "
            "name -> tensor, possibly nested under 'state_dict', 'model' or 'state_dict_ema'."
        )
    return state


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], own: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix carried by *every* key, unless the model's own keys have it too."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _filter_for_arch(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply the timm module's ``checkpoint_filter_fn`` (key remaps, pos-embed resampling), if any.

    These converters assume a checkpoint of their own family; on anything else
    they may fail, in which case the keys are matched unconverted (and the
    mismatch is reported below with the real key names).
    """
    module = sys.modules.get(type(model).__module__)
    filter_fn: Optional[Callable[..., dict[str, torch.Tensor]]] = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None or not type(model).__module__.startswith("timm."):
        return state
    try:
        out = filter_fn(dict(state), model)
    except Exception:
        return state
    return out if isinstance(out, dict) and out else state


# ---------------------------------------------------------------- per-key rules


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return f"model {cfg.get('architecture', type(model).__name__)!r}"


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier module(s), the ones num_classes resizes."""
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    modules = clf if isinstance(clf, (tuple, list)) else [clf]
    keys: set[str] = set()
    for name, m in model.named_modules():
        if name and any(m is c for c in modules if isinstance(c, nn.Module)):
            keys.update(f"{name}.{k}" for k in m.state_dict())
    return keys


def _first_conv_weight(model: nn.Module) -> Optional[str]:
    """Key of the input conv weight, from timm's ``pretrained_cfg['first_conv']``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, (tuple, list)):
        first = first[0] if first else None
    return f"{first}.weight" if first else None


def _adapt_first_conv(
    model: nn.Module, key: str, value: torch.Tensor, target: torch.Tensor, report: LoadReport
) -> Optional[torch.Tensor]:
    """Fit first-conv weights to the model's kernel and channels, or drop them (reported)."""
    if value.ndim != 4 or target.ndim != 4 or value.shape[0] != target.shape[0]:
        raise ModelError(
            f"Checkpoint key {key}: shape {tuple(value.shape)} cannot be adapted to the model's first conv "
            f"{tuple(target.shape)} (different output channels). Did you pick the right model name?"
        )
    how = []
    if value.shape[2:] != target.shape[2:]:
        conv = model.get_submodule(key.rsplit(".", 1)[0])
        patchify = isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == tuple(conv.stride)
        if not patchify:
            report.dropped_keys.append(
                (key, f"first-conv kernel {tuple(value.shape[2:])} != model {tuple(target.shape[2:])} "
                      "(small-input stem); left at random init")
            )
            return None
        how.append(f"patch kernel {tuple(value.shape[2:])} -> {tuple(target.shape[2:])} (timm resample_patch_embed)")
        value = resample_patch_embed(value, list(target.shape[2:]))
    if value.shape[1] != target.shape[1]:
        src = value.shape[1]
        try:
            value = adapt_input_conv(target.shape[1], value, base_chans=src)
        except (NotImplementedError, ValueError, AssertionError) as e:
            raise ModelError(
                f"Checkpoint key {key}: cannot adapt {src} input channels to {target.shape[1]}: {e}"
            ) from None
        how.append(f"input channels {src} -> {target.shape[1]} ("
                   f"{'summed' if target.shape[1] == 1 else 'repeated and rescaled'}, timm adapt_input_conv)")
    report.adapted_keys.append((key, "; ".join(how)))
    return value
