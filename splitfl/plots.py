"""Learning-curve plots written next to every run's results."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from splitfl.artifacts import save_figure  # noqa: E402


def plot_learning_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str) -> Path:
    """Train/val loss and val macro AUROC per epoch; one line per named run (e.g. per site)."""
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        suffix = f" ({label})" if len(histories) > 1 else ""
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "-o", ms=3, label=f"train{suffix}")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], "--", label=f"val{suffix}")
        ax_auc.plot(epochs, [r["val_auroc_macro"] for r in rows], "-o", ms=3, label=label)
    for ax in (ax_loss, ax_auc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=7)
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation macro AUROC")
    ax_auc.axhline(0.5, color="grey", lw=0.8, ls=":")
    if len(histories) > 1:
        ax_auc.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return save_figure(path, fig)
    finally:
        plt.close(fig)
