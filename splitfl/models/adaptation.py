"""Which encoder parameters a hospital trains: all, none, or the last N blocks.

Foundation models are adapted in three ways (FOCAL and the linear-probe
literature): frozen (only the head trains; the encoder's embeddings can be
computed once and cached), the last N blocks tuned (cheap, keeps the generic
early features), or full fine-tuning. "Block" means one of timm's own
fine-grained parameter groups (``model.group_matcher(coarse=False)``, the
grouping timm uses for layer-wise learning-rate decay): a ResNet's residual
block, a ViT's transformer block, a ConvNeXt stage's block. The final norm that
follows the last block (a ViT's ``norm``) always trains with it.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models import group_parameters

from .factory import ModelError

__all__ = ["last_block_parameters"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def last_block_parameters(model: nn.Module, n_blocks: int, exclude: set[str]) -> set[str]:
    """Names of the parameters of the last ``n_blocks`` blocks (and any final norm after them).

    Args:
        model: the whole timm model, before it is split.
        n_blocks: how many of the last blocks train (at least 1).
        exclude: parameter names that are not the encoder's (the classifier), ignored.

    Raises:
        ModelError: the model has no timm ``group_matcher``, or fewer blocks than asked.
    """
    name = type(model).__name__
    if n_blocks < 1:
        raise ModelError(f"model.tune_last_blocks={n_blocks} must be >= 1 (use model.freeze_encoder: true for none).")
    if not hasattr(model, "group_matcher"):
        raise ModelError(
            f"model.tune_last_blocks needs timm's group_matcher to find the blocks of {name}; this model has none. "
            "Use model.freeze_encoder (frozen) or full fine-tuning instead."
        )
    groups = group_parameters(model, model.group_matcher(coarse=False))
    encoder_groups = [
        [p for p in params if p not in exclude] for _, params in sorted(groups.items())
    ]
    encoder_groups = [g for g in encoder_groups if g]
    norm_params = {
        f"{mod_name}.{p}" if mod_name else p
        for mod_name, mod in model.named_modules() if isinstance(mod, _NORMS)
        for p, _ in mod.named_parameters(recurse=False)
    }
    # Trailing groups holding only normalisation parameters (a ViT's final norm) follow the last block.
    trailing = 0
    while trailing < len(encoder_groups) and all(p in norm_params for p in encoder_groups[-1 - trailing]):
        trailing += 1
    blocks = encoder_groups[: len(encoder_groups) - trailing]
    if n_blocks >= len(blocks):
        raise ModelError(
            f"model.tune_last_blocks={n_blocks} but {name} has {len(blocks)} blocks including its stem "
            f"(timm's parameter groups); use at most {len(blocks) - 1}, or drop the key for full fine-tuning."
        )
    chosen = blocks[-n_blocks:] + encoder_groups[len(blocks):]
    return {p for group in chosen for p in group}
