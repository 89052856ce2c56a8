"""Key layouts of public foundation-model checkpoints, converted to timm ViT names.

Users hold these files as released; none is in timm's layout except UNI:

* ``retfound``: RETFound (MAE ViT-L/16), ``torch.save({"model": state_dict})``
  of MAE's ``MaskedAutoencoderViT``: timm encoder names plus the MAE decoder.
* ``uni``: MahmoodLab UNI ``pytorch_model.bin``, a timm ``vit_large_patch16_224``
  state dict with LayerScale (``blocks.N.ls1.gamma``) and no head.
* ``dinov2``: facebookresearch DINOv2 hub files (``dinov2_vits14_pretrain.pth``):
  timm-like names plus ``mask_token``, optional ``register_tokens`` and SwiGLU ``w12/w3``.
* ``phikon``: owkin Phikon, a HuggingFace ``transformers`` ``ViTModel``
  (``embeddings.*``, ``encoder.layer.N.*``, separate query/key/value).
* ``timm``: a timm state dict; left to timm's own ``checkpoint_filter_fn``.

:func:`convert_checkpoint` checks the file against the named (or detected)
layout and returns timm-named tensors plus a :class:`KeyMapping` recording
where each model key came from and what was dropped on purpose, and why.
:func:`fit_vit_checkpoint` then fits the converted tensors to the model being
filled (LayerScale and register tokens must match; position embeddings are
resampled with timm's ``resample_abs_pos_embed`` and reported).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, get_args

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from .factory import ModelError

__all__ = [
    "FORMATS",
    "FOUNDATION_FORMATS",
    "KeyMapping",
    "PretrainedFormat",
    "convert_checkpoint",
    "detect_format",
    "fit_vit_checkpoint",
]

PretrainedFormat = Literal["auto", "timm", "retfound", "uni", "dinov2", "phikon"]
FORMATS: tuple[str, ...] = get_args(PretrainedFormat)
# Formats converted here (encoder-only ViT checkpoints); 'timm' goes through timm's checkpoint_filter_fn instead.
FOUNDATION_FORMATS: tuple[str, ...] = ("retfound", "uni", "dinov2", "phikon")

# timm model (and kwargs) each format is meant for, named when a checkpoint meets another architecture.
SUGGESTED_MODEL: dict[str, str] = {
    "retfound": "model.name: vit_large_patch16_224",
    "uni": "model.name: vit_large_patch16_224 with model.timm_kwargs: {init_values: 1.0e-5}",
    "dinov2": "model.name: vit_small_patch14_dinov2 (vit_base/large/giant_patch14_dinov2, *_reg4_dinov2 for registers)",
    "phikon": "model.name: vit_base_patch16_224",
}

_MAE_DROP = "MAE decoder / mask token, pretraining only, not part of the encoder"
_DINOV2_MASK_DROP = "DINOv2 mask token, replaces masked patches in iBOT pretraining only, not part of the encoder"
_HF_MASK_DROP = "HF ViT mask token, masked-image-modelling pretraining only, not part of the encoder"
_HF_POOLER_DROP = ("HF ViTModel pooler (dense + tanh on the class token), not part of timm's ViT; "
                   "Phikon's features are the class token of last_hidden_state, which timm's token pooling returns")

_VIT_CORE: tuple[str, ...] = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
_HF_VIT_CORE: tuple[str, ...] = (
    "embeddings.patch_embeddings.projection.weight",
    "encoder.layer.0.attention.attention.query.weight",
    "encoder.layer.0.layernorm_before.weight",
)
_LAYER_SCALE = re.compile(r"blocks\.\d+\.ls[12]\.gamma$")


@dataclass
class KeyMapping:
    """How a checkpoint's keys became model keys.

    Attributes:
        format: the layout used (``retfound``, ``uni``, ``dinov2``, ``phikon`` or ``timm``).
        detected: True when ``format`` was detected from the keys (``auto``).
        sources: model key -> checkpoint key(s) its tensor was built from
            (empty for ``timm``, whose own ``checkpoint_filter_fn`` converts).
        dropped: ``(checkpoint key, reason)`` for entries left out on purpose.
        notes: model key -> how its tensor was built when it is not a plain
            copy (q/k/v concatenated, class position folded into the token).
    """

    format: str
    detected: bool = False
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def renamed(self) -> list[tuple[str, str]]:
        """``(checkpoint key(s), model key)`` for every tensor whose name or value changed."""
        out = []
        for target, src in self.sources.items():
            if src != (target,) or target in self.notes:
                label = " + ".join(src) + (f" ({self.notes[target]})" if target in self.notes else "")
                out.append((label, target))
        return out

    def record(self, key: str, target: Optional[str] = None) -> str:
        """Record that checkpoint ``key`` is loaded as ``target`` (default: same name)."""
        target = target or key
        self.sources[target] = (key,)
        return target


# ---------------------------------------------------------------- detection


def _is_timm_vit(keys: set[str]) -> bool:
    return all(k in keys for k in _VIT_CORE)


def _has_layer_scale(keys: set[str]) -> bool:
    return any(_LAYER_SCALE.match(k) for k in keys)


def _has_mae_decoder(keys: set[str]) -> bool:
    return any(k.startswith("decoder_") for k in keys)


def _strip_hf_prefix(keys: set[str]) -> set[str]:
    return {k[len("vit."):] if k.startswith("vit.") else k for k in keys}


def _matches(fmt: str, keys: set[str]) -> bool:
    """Whether ``keys`` are in the layout of ``fmt`` (as released, see the module docstring)."""
    if fmt == "phikon":
        return all(k in _strip_hf_prefix(keys) for k in _HF_VIT_CORE)
    if not _is_timm_vit(keys):
        return fmt == "timm"
    layer_scale = _has_layer_scale(keys)
    if fmt == "retfound":
        return not layer_scale and "register_tokens" not in keys
    if fmt == "dinov2":
        return layer_scale and "mask_token" in keys and not _has_mae_decoder(keys)
    if fmt == "uni":
        return layer_scale and not ({"mask_token", "register_tokens"} & keys) and not _has_mae_decoder(keys)
    return fmt == "timm"


def detect_format(keys: set[str]) -> str:
    """The layout ``keys`` are in; ``timm`` when none of the foundation layouts fits.

    RETFound needs its MAE leftovers (``mask_token`` or ``decoder_*``) to be
    told from a plain timm ViT; UNI is a timm ViT with LayerScale and without a
    classifier (timm's own DINOv2 ports look the same and load the same way).
    """
    if _matches("phikon", keys):
        return "phikon"
    if _is_timm_vit(keys):
        if _matches("retfound", keys) and ("mask_token" in keys or _has_mae_decoder(keys)):
            return "retfound"
        if _matches("dinov2", keys):
            return "dinov2"
        if _matches("uni", keys) and not any(k.startswith("head.") for k in keys):
            return "uni"
    return "timm"


_EXPECTED: dict[str, str] = {
    "retfound": "MAE ViT encoder keys (cls_token, pos_embed, patch_embed.proj.weight, blocks.0.attn.qkv.weight) "
                "without LayerScale (blocks.N.ls1.gamma), usually with the MAE decoder (mask_token, decoder_*)",
    "uni": "timm ViT keys (cls_token, pos_embed, patch_embed.proj.weight, blocks.0.attn.qkv.weight) with "
           "LayerScale (blocks.N.ls1.gamma, blocks.N.ls2.gamma) and no mask_token or MAE decoder",
    "dinov2": "DINOv2 keys (cls_token, pos_embed, mask_token, patch_embed.proj.weight, blocks.0.attn.qkv.weight, "
              "blocks.N.ls1.gamma), no MAE decoder",
    "phikon": "HuggingFace ViTModel keys (embeddings.patch_embeddings.projection.weight, "
              "encoder.layer.0.attention.attention.query.weight, encoder.layer.0.layernorm_before.weight), "
              "optionally prefixed by 'vit.'",
}


_TELLING = re.compile(r"(mask_token|register_tokens|reg_token|decoder_|blocks\.0\.ls1\.gamma|(vit\.)?embeddings\.|"
                      r"(vit\.)?encoder\.layer\.0\.(attention\.attention\.query|layernorm_before|layer_scale1)|"
                      r"head\.weight|pooler\.)")


def _telling_keys(keys: list[str], limit: int = 8) -> str:
    """A few real key names in file order, the ones that tell layouts apart first (two MAE decoder keys)."""
    telling = [k for k in keys if _TELLING.match(k) and not k.startswith("decoder_")]
    telling += [k for k in keys if k.startswith("decoder_")][:2]
    shown = (telling[:limit // 2 + 1] + [k for k in keys if not _TELLING.match(k)])[:limit]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def _layout_error(fmt: str, ordered: list[str], path: str) -> ModelError:
    keys = set(ordered)
    found = detect_format(keys)
    hf_dinov2 = any(re.match(r"(vit\.|dinov2\.)?encoder\.layer\.0\.layer_scale1\.lambda1$", k) for k in keys)
    if hf_dinov2:
        hint = ("These are HuggingFace Dinov2Model keys (e.g. Phikon-v2), which no pretrained_format converts; "
                "export the backbone to timm names first.")
    elif found != fmt and found != "timm":
        hint = f"The keys match the {found!r} layout: set model.pretrained_format: {found} (or auto)."
    elif _matches("uni", keys):
        hint = ("The keys are a timm ViT with LayerScale (UNI's layout): set model.pretrained_format: uni "
                "(or auto).")
    elif _matches("retfound", keys):
        hint = ("The keys are a timm ViT without LayerScale (a plain timm ViT, or an MAE/RETFound encoder without "
                "its decoder): set model.pretrained_format: timm or retfound (or auto).")
    else:
        hint = ("No foundation layout matches: check the file, or set model.pretrained_format: timm for a "
                "timm state dict.")
    return ModelError(
        f"Checkpoint {path} is not in the {fmt!r} layout (model.pretrained_format: {fmt}). Expected "
        f"{_EXPECTED[fmt]}; found {len(keys)} keys: {_telling_keys(ordered)}. {hint}"
    )


# ---------------------------------------------------------------- converters (file layout -> timm names)


def _convert_retfound(state: dict[str, torch.Tensor], mapping: KeyMapping) -> dict[str, torch.Tensor]:
    """MAE encoder names already are timm's; the decoder and mask token are pretraining-only."""
    out = {}
    for k, v in state.items():
        if k == "mask_token" or k.startswith("decoder_"):
            mapping.dropped.append((k, _MAE_DROP))
        else:
            out[mapping.record(k)] = v
    return out


def _convert_uni(state: dict[str, torch.Tensor], mapping: KeyMapping) -> dict[str, torch.Tensor]:
    """UNI is a timm state dict: nothing to rename (LayerScale is checked against the model later)."""
    return {mapping.record(k): v for k, v in state.items()}


def _convert_dinov2(state: dict[str, torch.Tensor], mapping: KeyMapping) -> dict[str, torch.Tensor]:
    """DINOv2 hub layout -> timm, the conversion timm's ``checkpoint_filter_fn`` applies to these files.

    ``mask_token`` is dropped; SwiGLU ``mlp.w12/w3`` (ViT-g) become ``mlp.fc1/fc2``
    (timm's packed SwiGLU). Register models add register tokens after the class
    token without a position; timm's ``*_reg4_dinov2`` models (``no_embed_class``)
    keep positions for patches only, so the class position is added to the class
    token and removed from ``pos_embed``.
    """
    out: dict[str, torch.Tensor] = {}
    registers = "register_tokens" in state
    for k, v in state.items():
        if k == "mask_token":
            mapping.dropped.append((k, _DINOV2_MASK_DROP))
        elif k == "register_tokens":
            out[mapping.record(k, "reg_token")] = v
        elif registers and k == "cls_token":
            out["cls_token"] = v + state["pos_embed"][:, :1]
            mapping.sources["cls_token"] = ("cls_token", "pos_embed")
            mapping.notes["cls_token"] = "class position pos_embed[:, 0] added (timm no_embed_class)"
        elif registers and k == "pos_embed":
            out["pos_embed"] = v[:, 1:]
            mapping.record(k)
            mapping.notes["pos_embed"] = "class position removed, patch positions only (timm no_embed_class)"
        else:
            target = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
            target = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", target)
            out[mapping.record(k, target)] = v
    return out


# HF ViTModel (per-layer suffix) -> timm block (per-block suffix); q/k/v are handled separately.
_HF_LAYER_RENAMES: tuple[tuple[str, str], ...] = (
    ("layernorm_before.", "norm1."),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_TOP_RENAMES: dict[str, str] = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",  # ViTForImageClassification
    "classifier.bias": "head.bias",
}
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)$")


def _convert_phikon(state: dict[str, torch.Tensor], mapping: KeyMapping) -> dict[str, torch.Tensor]:
    """HuggingFace ``ViTModel`` -> timm ``VisionTransformer``.

    HF keeps query, key and value as three Linear layers; timm has one ``qkv``
    Linear whose output is ``[q; k; v]`` (then split into heads), so the three
    weights/biases are concatenated in that order along the output dimension.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, v in state.items():
        k = key[len("vit."):] if key.startswith("vit.") else key
        if k in _HF_TOP_RENAMES:
            out[mapping.record(key, _HF_TOP_RENAMES[k])] = v
        elif k.startswith("pooler."):
            mapping.dropped.append((key, _HF_POOLER_DROP))
        elif k == "embeddings.mask_token":
            mapping.dropped.append((key, _HF_MASK_DROP))
        elif m := _HF_QKV.match(k):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = (key, v)
        elif (m := _HF_LAYER.match(k)) and any(m.group(2).startswith(src) for src, _ in _HF_LAYER_RENAMES):
            src, dst = next((s, d) for s, d in _HF_LAYER_RENAMES if m.group(2).startswith(s))
            out[mapping.record(key, f"blocks.{m.group(1)}.{dst}{m.group(2)[len(src):]}")] = v
        else:
            out[mapping.record(key)] = v  # unknown: kept under its own name, reported as unexpected
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise ModelError(
                f"Phikon/HF ViT checkpoint: encoder.layer.{layer}.attention.attention has no {'/'.join(missing)} "
                f"{kind}; the file is incomplete (query, key and value are needed to build timm's attn.qkv)."
            )
        target = f"blocks.{layer}.attn.qkv.{kind}"
        names = [parts[p][0] for p in ("query", "key", "value")]
        out[target] = torch.cat([parts[p][1] for p in ("query", "key", "value")], dim=0)
        mapping.sources[target] = tuple(names)
        mapping.notes[target] = "concatenated q, k, v"
    return out


_CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor], KeyMapping], dict[str, torch.Tensor]]] = {
    "retfound": _convert_retfound,
    "uni": _convert_uni,
    "dinov2": _convert_dinov2,
    "phikon": _convert_phikon,
}


def convert_checkpoint(
    state: dict[str, torch.Tensor], fmt: str = "auto", path: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], KeyMapping]:
    """Rename a checkpoint as read from disk to timm ViT keys, recording the mapping.

    Args:
        state: tensors as read from the file (wrapper prefixes already removed).
        fmt: one of :data:`FORMATS`; ``auto`` detects it with :func:`detect_format`.
        path: the file, for error messages.

    Returns:
        The converted state dict and its :class:`KeyMapping`. For ``timm`` the
        state dict is returned unchanged (timm's ``checkpoint_filter_fn`` applies later).

    Raises:
        ModelError: unknown format, or a file not in the named format's layout
            (the message names the layout the keys do match, if any).
    """
    if fmt not in FORMATS:
        raise ModelError(f"model.pretrained_format: {fmt!r} is not one of {', '.join(FORMATS)}.")
    keys = set(state)
    detected = fmt == "auto"
    if detected:
        fmt = detect_format(keys)
    elif fmt != "timm" and not _matches(fmt, keys):
        raise _layout_error(fmt, list(state), path)
    mapping = KeyMapping(format=fmt, detected=detected)
    if fmt == "timm":
        return state, mapping
    return _CONVERTERS[fmt](state, mapping), mapping


# ---------------------------------------------------------------- fitting to the model


def fit_vit_checkpoint(
    state: dict[str, torch.Tensor], model: nn.Module, mapping: KeyMapping, path: str, model_name: str
) -> list[tuple[str, str]]:
    """Make converted ViT tensors fit ``model`` in place; return ``(key, how)`` for each adapted key.

    LayerScale and register tokens change what a block computes, so a
    checkpoint and a model that disagree on them are an error (with the
    ``timm_kwargs`` to set) rather than silently half-loaded weights. Position
    embeddings for another grid (image or patch size) are resampled with timm's
    :func:`~timm.layers.resample_abs_pos_embed`.
    """
    fmt = mapping.format
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"model.pretrained_format: {fmt} is a Vision Transformer checkpoint ({path}), but {model_name} is a "
            f"{type(model).__name__}, not a timm VisionTransformer. Set {SUGGESTED_MODEL[fmt]}."
        )
    own = model.state_dict()
    ckpt_ls = sorted(k for k in state if _LAYER_SCALE.match(k))
    model_ls = sorted(k for k in own if _LAYER_SCALE.match(k))
    if ckpt_ls and not model_ls:
        raise ModelError(
            f"Checkpoint {path} ({fmt}) has LayerScale weights ({', '.join(ckpt_ls[:2])}, ...) but {model_name} "
            "was built without LayerScale, so they cannot be loaded and every block would compute something else. "
            "Build the model with it: model.timm_kwargs: {init_values: 1.0e-5} (the value is only the init; the "
            "checkpoint's gammas replace it)"
            + (", or use the matching *_patch14_dinov2 model, which has it." if fmt == "dinov2" else ".")
        )
    if model_ls and not ckpt_ls:
        raise ModelError(
            f"{model_name} has LayerScale ({model_ls[0]}, from timm init_values or a *_dinov2 model) but checkpoint "
            f"{path} ({fmt}) has none, so every block would be scaled by the untrained init value. Remove "
            "init_values from model.timm_kwargs (or pick a model without LayerScale, e.g. vit_large_patch16_224)."
        )
    ckpt_reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    model_reg = getattr(model, "num_reg_tokens", 0)
    if ckpt_reg != model_reg:
        raise ModelError(
            f"Checkpoint {path} ({fmt}) has {ckpt_reg} register tokens but {model_name} has {model_reg}. "
            + (f"Use a *_reg{ckpt_reg}_dinov2 model (e.g. vit_small_patch14_reg{ckpt_reg}_dinov2) or "
               f"model.timm_kwargs: {{reg_tokens: {ckpt_reg}, no_embed_class: true}}."
               if ckpt_reg else "Use a model without register tokens (remove reg_tokens from model.timm_kwargs).")
        )
    adapted: list[tuple[str, str]] = []
    pos = state.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.ndim == 3 and pos.shape[-1] == model.pos_embed.shape[-1]:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        side = math.isqrt(max(pos.shape[1] - prefix, 0))
        if side * side != pos.shape[1] - prefix or side == 0:
            raise ModelError(
                f"Checkpoint {path} ({fmt}): pos_embed {tuple(pos.shape)} is not {prefix} class/register "
                f"position(s) plus a square grid, as {model_name} expects (num_prefix_tokens={model.num_prefix_tokens}"
                f", no_embed_class={getattr(model, 'no_embed_class', False)}). The model's token layout differs "
                f"from the checkpoint's; check class_token/reg_tokens/no_embed_class in model.timm_kwargs."
            )
        grid = tuple(model.patch_embed.grid_size)
        if (side, side) != grid:
            state["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix
            )
            adapted.append((
                "pos_embed",
                f"{tuple(pos.shape)} -> {tuple(state['pos_embed'].shape)}, grid {side}x{side} -> {grid[0]}x{grid[1]}"
                " for this image/patch size (timm resample_abs_pos_embed, bicubic)",
            ))
    return adapted
