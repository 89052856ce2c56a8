"""Figures of the attack harness: originals vs reconstructions, and leakage across variants."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch

from attacks.metrics import to_unit
from splitfl.artifacts import save_figure


def _show(ax: Any, image: torch.Tensor) -> None:
    img = to_unit(image)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_montage(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, str]], path: str | Path, title: str,
                 max_images: int = 16) -> Path:
    """Two rows: original images on top, the attack's paired reconstruction below (blank: none paired)."""
    items = [(o, r, label) for originals, paired, label in pairs for o, r in zip(originals, paired)][:max_images]
    n = max(len(items), 1)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n + 0.6, 3.2), squeeze=False)
    for j, (orig, rec, label) in enumerate(items):
        _show(axes[0][j], orig)
        _show(axes[1][j], rec)
        axes[0][j].set_title(label.replace("round ", "r").replace(" site ", "/s"), fontsize=7)
    if not items:
        for ax in axes[:, 0]:
            ax.axis("off")
    axes[0][0].set_ylabel("original", fontsize=8)
    axes[1][0].set_ylabel("attack", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = save_figure(path, fig)
    plt.close(fig)
    return path


def plot_summary(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Leakage rate per variant (bars) and leakage against the margin over the mean image (curves)."""
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [r["variant"] for r in results]
    bars.bar(range(len(names)), [100 * r["leakage_rate"] for r in results], color="tab:red")
    bars.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("leakage rate (%)")
    bars.set_ylim(0, 100)
    bars.set_title("images leaked (re-identified and margin >= 0.1)", fontsize=9)
    for r in results:
        curve = r.get("leakage_vs_margin") or []
        lines.plot([m for m, _ in curve], [100 * v for _, v in curve], marker="o", ms=3, label=r["variant"])
    lines.set_xlabel("required SSIM gain over the dataset-mean image")
    lines.set_ylabel("leakage rate (%)")
    lines.set_ylim(-2, 102)
    lines.legend(fontsize=7)
    lines.set_title("leakage vs margin", fontsize=9)
    fig.tight_layout()
    path = save_figure(path, fig)
    plt.close(fig)
    return path


def plot_active_summary(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One bar per variant: images leaked (image attacks) or labels inferred (label attacks), chance marked."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(rows) + 2), 3.8))
    for j, r in enumerate(rows):
        labels = r.get("label_accuracy") is not None
        value = r["label_accuracy"] if labels else (r.get("leakage_rate") or 0.0)
        chance = r.get("label_chance") if labels else r.get("chance_leakage_rate")
        ax.bar(j, 100 * value, color="tab:purple" if labels else "tab:red", hatch="//" if labels else None)
        if chance is not None:
            ax.plot([j - 0.4, j + 0.4], [100 * chance] * 2, color="black", lw=1)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("% leaked (red: images; hatched: labels)")
    ax.set_ylim(0, 102)
    ax.set_title("malicious server: leakage per variant (black line: chance)", fontsize=9)
    fig.tight_layout()
    path = save_figure(path, fig)
    plt.close(fig)
    return path
