"""What a pretraining run leaves in ``--out`` besides its checkpoint: the encoder, the loss curve, the summary.

``encoder.pt`` is a plain ``{name: tensor}`` dict in the timm model's own key
names, classifier excluded, so :func:`splitfl.models.load_pretrained` (``model.pretrained``
in any splitfl config) fills every encoder key of the same architecture and
finds nothing it does not know. It holds no decoder or projection keys (and in
particular no ``mask_token``, which timm's ViT loader would take for a DINOv2
checkpoint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402

from splitfl.artifacts import save_checkpoint, save_figure  # noqa: E402

ENCODER = "encoder.pt"


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (none when it was built with num_classes=0)."""
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    modules = [m for m in (clf if isinstance(clf, (tuple, list)) else [clf]) if isinstance(m, nn.Module)]
    return {
        f"{name}.{key}" for name, m in model.named_modules() if name and any(m is c for c in modules)
        for key in m.state_dict()
    }


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The timm model's state dict (parameters and buffers such as BatchNorm statistics) on the CPU, classifier excluded."""
    drop = classifier_keys(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in drop}


def save_encoder(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Write ``encoder.pt`` atomically; returns what pretrain.json says about it."""
    state = encoder_state(model)
    save_checkpoint(path, state)
    return {
        "path": str(path),
        "tensors": len(state),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def plot_loss_curve(history: Sequence[Mapping[str, float]], path: str | Path, title: str) -> Path:
    """Training loss and learning rate per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["loss"] for r in history], "-o", ms=3, color="tab:blue", label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("pretraining loss", color="tab:blue")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [r["lr"] for r in history], "--", color="tab:grey", label="lr (end of epoch)")
    lr_ax.set_ylabel("learning rate", color="tab:grey")
    ax.set_title(title)
    fig.tight_layout()
    try:
        return save_figure(path, fig)
    finally:
        plt.close(fig)
