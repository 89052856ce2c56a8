"""Learning-curve plots written next to every run's results."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from splitfl.artifacts import save_figure  # noqa: E402
from splitfl.units import format_bytes  # noqa: E402


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


def plot_comparison(
    rows: Sequence[Mapping[str, object]], path: str | Path, title: str, reference_auroc: float | None = None
) -> Path:
    """Regimes side by side: test macro AUROC, bytes per round (log axis) and training time, one bar per variant.

    ``rows`` hold ``variant``, ``regime``, ``test_auroc_macro``, ``bytes_per_round`` and ``train_seconds``
    (as :mod:`splitfl.compare` writes them); ``reference_auroc`` (the centralized run) is drawn as a dashed line.
    """
    names = [str(r["variant"]) for r in rows]
    regimes = list(dict.fromkeys(str(r["regime"]) for r in rows))
    palette = plt.get_cmap("tab10")
    colours = [palette(regimes.index(str(r["regime"])) % 10) for r in rows]
    y = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 1.2 + 0.45 * max(len(rows), 3)), sharey=True)
    ax_auc, ax_bytes, ax_time = axes

    aucs = [r["test_auroc_macro"] for r in rows]
    ax_auc.barh(y, [a if a is not None else 0.0 for a in aucs], color=colours)
    for i, a in enumerate(aucs):
        ax_auc.text(a if a is not None else 0.0, i, f" {a:.3f}" if a is not None else " n/a", va="center", fontsize=8)
    known = [float(a) for a in aucs if a is not None]
    low = min(known + ([reference_auroc] if reference_auroc is not None else []), default=0.5)
    ax_auc.set_xlim(max(0.0, min(0.5, low - 0.05)), 1.08)
    ax_auc.axvline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    if reference_auroc is not None:
        ax_auc.axvline(reference_auroc, color="black", lw=1.2, ls="--", label=f"centralized {reference_auroc:.3f}")
    ax_auc.legend(fontsize=8, loc="lower right")
    ax_auc.set_xlabel("test macro AUROC")

    sent = [float(r["bytes_per_round"] or 0.0) for r in rows]
    positive = [b for b in sent if b > 0]
    ax_bytes.set_xscale("log")
    if positive:
        floor = min(positive) / 10
        ax_bytes.barh(y, [b - floor if b > 0 else 0.0 for b in sent], left=floor, color=colours)
        ax_bytes.set_xlim(floor, max(positive) * 30)
    for i, b in enumerate(sent):
        ax_bytes.text(b if b > 0 else (min(positive) / 10 if positive else 1), i,
                      f" {format_bytes(b)}" if b > 0 else " no network", va="center", fontsize=8)
    ax_bytes.set_xlabel("bytes sent per round, up + down (log)")

    secs = [float(r["train_seconds"] or 0.0) for r in rows]
    ax_time.barh(y, secs, color=colours)
    for i, s in enumerate(secs):
        ax_time.text(s, i, f" {s:.1f} s", va="center", fontsize=8)
    ax_time.set_xlim(0, max(secs + [1e-9]) * 1.3)
    ax_time.set_xlabel("training time (s)")

    ax_auc.set_yticks(y)
    ax_auc.set_yticklabels(names)
    ax_auc.invert_yaxis()  # config order, top to bottom
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return save_figure(path, fig)
    finally:
        plt.close(fig)

