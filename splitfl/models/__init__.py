"""Models for split learning: timm backbones cut into client encoder and server head.

Typical use goes through :func:`build_split_model`, which turns a
:class:`~splitfl.config.ModelConfig` into a ready :class:`SplitModel`:
create (timm, random init) -> load local foundation weights -> split -> freeze.
"""
from __future__ import annotations

from typing import Optional

from ..config import ModelConfig
from . import heads, lenet  # noqa: F401  (lenet registers splitfl_lenet with timm)
from .adaptation import last_block_parameters
from .checkpoint import LoadReport, load_pretrained
from .factory import ModelError, create_model
from .formats import FORMATS, KeyMapping, detect_format
from .heads import LinearHead, MLPHead, PolyActivation
from .split import SplitModel, split_model, valid_cuts

__all__ = [
    "FORMATS",
    "KeyMapping",
    "LinearHead",
    "LoadReport",
    "MLPHead",
    "ModelError",
    "PolyActivation",
    "SplitModel",
    "build_split_model",
    "create_model",
    "detect_format",
    "heads",
    "load_pretrained",
    "split_model",
    "valid_cuts",
]


def build_split_model(
    cfg: ModelConfig, num_classes: int, in_chans: int, img_size: int
) -> tuple[SplitModel, Optional[LoadReport]]:
    """Build the split model a run config asks for; also return the weight-loading report.

    Weights are loaded *before* the split so that encoder and head share the
    loaded tensors; the encoder is frozen last (``cfg.freeze_encoder``, or all
    but its last ``cfg.tune_last_blocks`` blocks).
    """
    if cfg.freeze_encoder and cfg.tune_last_blocks is not None:
        raise ModelError(
            "model.freeze_encoder: true and model.tune_last_blocks are both set; choose one: frozen encoder "
            "(only the head trains) or the last N blocks tuned."
        )
    model = create_model(
        cfg.name,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        small_input_stem=cfg.small_input_stem,
        drop_rate=cfg.drop_rate,
        **cfg.timm_kwargs,
    )
    report = load_pretrained(model, cfg.pretrained, fmt=cfg.pretrained_format) if cfg.pretrained else None
    split = split_model(
        model,
        cut=cfg.cut,
        mlp_hidden=cfg.mlp_hidden,
        mlp_activation=cfg.mlp_activation,
        input_shape=(in_chans, img_size, img_size),
    )
    if cfg.freeze_encoder:
        split.freeze_encoder()
    elif cfg.tune_last_blocks is not None:
        encoder_ids = {id(p) for p in split.encoder.parameters()}
        exclude = {n for n, p in model.named_parameters() if id(p) not in encoder_ids}
        names = last_block_parameters(model, cfg.tune_last_blocks, exclude)
        split.freeze_encoder_except({id(p) for n, p in model.named_parameters() if n in names})
    return split, report
