"""Sanity evidence for the attack core: DLG and IG on the sigmoid LeNet, real PneumoniaMNIST.

Shows the attacks work where they should (batch 1, clean gradient) and fade
where they should (larger batches, Gaussian noise on the gradient), with the
leakage rate next to SSIM. Runs in a few minutes on 2 CPU cores::

    python -m attacks.sanity --out DIR [--root MEDMNIST_DIR]

Writes DIR/sanity.json, DIR/ssim_vs_batch.png, DIR/ssim_vs_noise.png and
DIR/montage.png (originals vs reconstructions).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import torch

from attacks.gradient_inversion import (
    add_gaussian_noise,
    dlg,
    gradients_from_update,
    inverting_gradients,
    local_update,
    model_gradients,
)
from attacks.leakage import leak_flags
from attacks.metrics import match_reconstructions, psnr, ssim
from attacks.models import lenet_dlg
from attacks.runtime import torch_threads
from splitfl.data.medmnist_files import load_medmnist

BATCH_SIZES = (1, 2, 4, 8)
NOISE_LEVELS = (0.0, 1e-3, 1e-2, 1e-1)
SHAPE = (1, 28, 28)


def _load(root: str | None, n_distractors: int) -> dict[str, torch.Tensor]:
    """Test images to attack, train images as distractors, the train-set mean image; all in [-1, 1]."""

    splits = load_medmnist("pneumoniamnist", root)
    test, train = splits.test, splits.train

    def to_t(ds, idx) -> torch.Tensor:
        return torch.stack([ds[int(i)][0] for i in idx])

    return {
        "test_x": to_t(test, range(len(test))),
        "test_y": torch.as_tensor(test.labels[:, 0] if test.labels.ndim == 2 else test.labels).long(),
        "distractors": to_t(train, range(n_distractors)),
        "mean_image": torch.from_numpy(train.images.astype(np.float32).mean(axis=0) / 127.5 - 1.0).permute(2, 0, 1),
    }


def _attack(method: str, model, grads, batch: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "dlg":
        r = dlg(model, grads, batch, SHAPE, iterations=args.dlg_iterations, restarts=args.dlg_restarts,
                seed=args.seed, progress=False)
    else:
        r = inverting_gradients(model, grads, batch, SHAPE, iterations=args.ig_iterations, seed=args.seed,
                                progress=False)
    return r.images, r.labels


def run_setting(method: str, batch: int, noise: float, data, model, args, local_steps: int = 0) -> dict:
    """Attack ``args.images`` test images in batches of ``batch``; SSIM/PSNR after Hungarian matching."""
    n_batches = max(1, math.ceil(args.images / batch))
    recs, origs, label_hits = [], [], 0
    start = time.time()
    for b in range(n_batches):
        x = data["test_x"][b * batch : (b + 1) * batch]
        y = data["test_y"][b * batch : (b + 1) * batch]
        if local_steps:
            delta = local_update(model, x, y, local_steps, args.local_lr)
            grads = gradients_from_update(delta, local_steps, args.local_lr)
        else:
            grads = model_gradients(model, x, y)
        grads = add_gaussian_noise(grads, noise, seed=args.seed + b)
        images, labels = _attack(method, model, grads, batch, args)
        m = match_reconstructions(images, x)
        recs.append(images[m.perm].detach())
        origs.append(x)
        label_hits += int((torch.sort(labels).values == torch.sort(y).values).sum())
    recs_t, origs_t = torch.cat(recs), torch.cat(origs)
    per_image = ssim(recs_t, origs_t)
    leak = leak_flags(recs_t, origs_t, data["distractors"], data["mean_image"])
    return {
        "method": method, "batch_size": batch, "noise": noise, "local_steps": max(1, local_steps),
        "n_images": len(origs_t), "ssim_mean": float(per_image.mean()), "ssim": per_image.tolist(),
        "psnr_mean": float(psnr(recs_t, origs_t).mean()),
        "label_accuracy": label_hits / len(origs_t), "leakage_rate": leak.rate,
        "reidentified": float(leak.reidentified.float().mean()), "seconds": round(time.time() - start, 1),
        "_recs": recs_t[:4],
    }


def _plot(results: list[dict], out: Path, data) -> None:
    for key, xs, fname, xlabel in (("batch_size", BATCH_SIZES, "ssim_vs_batch.png", "batch size"),
                                   ("noise", NOISE_LEVELS, "ssim_vs_noise.png", "noise std / ||g|| (per coordinate)")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in ("dlg", "ig"):
            rows = [r for r in results if r["sweep"] == key and r["method"] == method]
            pos = list(range(len(rows)))
            ax.plot(pos, [r["ssim_mean"] for r in rows], "o-", label=f"{method} SSIM")
            ax.plot(pos, [r["leakage_rate"] for r in rows], "x--", label=f"{method} leakage rate")
            ax.set_xticks(pos, [str(r[key]) for r in rows])
        ax.axhline(data["mean_ssim"], color="grey", lw=0.8, ls=":", label="mean image SSIM")
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("LeNet (sigmoid), PneumoniaMNIST")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    wanted = {("batch_size", 1, 0.0), ("batch_size", 8, 0.0), ("noise", 1, 0.1), ("fedavg", 1, 0.0)}
    shown = [r for r in results if (r["sweep"], r["batch_size"], r["noise"]) in wanted]
    rows = [("original", data["test_x"][:4])] + [
        (f"{r['method']} b{r['batch_size']} n{r['noise']:g} k{r['local_steps']}", r["_recs"]) for r in shown
    ]
    fig, axes = plt.subplots(len(rows), 4, figsize=(6, 1.5 * len(rows)))
    for i, (name, imgs) in enumerate(rows):
        for j in range(4):
            axes[i, j].imshow(((imgs[j, 0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "montage.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--root", default=None, help="MedMNIST folder (default $SPLITFL_MEDMNIST_DIR)")
    p.add_argument("--images", type=int, default=4, help="real images attacked per setting")
    p.add_argument("--distractors", type=int, default=200)
    p.add_argument("--dlg-iterations", type=int, default=40, help="L-BFGS steps per DLG start")
    p.add_argument("--dlg-restarts", type=int, default=2)
    p.add_argument("--ig-iterations", type=int, default=300)
    p.add_argument("--local-steps", type=int, default=5, help="FedAvg setting: local SGD steps")
    p.add_argument("--local-lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with torch_threads(args.threads):
        data = _load(args.root, args.distractors)
        data["mean_ssim"] = float(ssim(data["mean_image"].expand_as(data["test_x"]), data["test_x"]).mean())
        model = lenet_dlg(*SHAPE, num_classes=2, seed=args.seed)
        results = []
        plan = [("batch_size", m, b, 0.0, 0) for m in ("dlg", "ig") for b in BATCH_SIZES]
        plan += [("noise", m, 1, level, 0) for m in ("dlg", "ig") for level in NOISE_LEVELS]
        plan += [("fedavg", "ig", 1, 0.0, args.local_steps)]
        for sweep, method, b, level, k in plan:
            r = {"sweep": sweep, **run_setting(method, b, level, data, model, args, k)}
            results.append(r)
            print(f"{r['sweep']:>10} {r['method']:>3} b={r['batch_size']} noise={r['noise']:g} k={r['local_steps']}: "
                  f"SSIM {r['ssim_mean']:.3f} PSNR {r['psnr_mean']:.1f} labels {r['label_accuracy']:.2f} "
                  f"leak {r['leakage_rate']:.2f} ({r['seconds']}s)", flush=True)
        _plot(results, args.out, data)
    report = {
        "model": "LeNetDLG(1x28x28, 2 classes, U(-0.5,0.5) init)", "data": "pneumoniamnist test (targets), train (distractors, mean image)",
        "ssim": "torchmetrics gaussian 11, sigma 1.5, data_range 1.0 on images mapped [-1,1] -> [0,1]",
        "noise": "per-coordinate Gaussian std = level * ||g||_2", "mean_image_ssim_test": data["mean_ssim"],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "seconds": round(time.time() - t0, 1),
    }
    (args.out / "sanity.json").write_text(json.dumps(report, indent=2))
    print(f"mean-image SSIM on the test set: {data['mean_ssim']:.3f}; total {report['seconds']}s -> {args.out}")
    return report


if __name__ == "__main__":
    main()
