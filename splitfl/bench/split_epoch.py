"""Side-by-side epoch time of split-plain and split-he on one config.

Image mode (default): the encoder dominates a split-learning epoch; this measures what the encryption adds
on top of it, end to end (encoder forward/backward, the messages, the server head, evaluation of the
validation split), with both regimes run alternately in one process so machine noise hits both alike.

``--frozen``: a linear probe on cached embeddings at foundation-model width (default 90,000 training
embeddings, d=768, K=9). The real hospitals and server (SplitRunner, SplitServer, the transports,
PackedLinearHE) train the head for one epoch over embeddings a frozen encoder computed once; only that
epoch is timed (see :func:`run_frozen`).

    python bench/split_epoch.py [--size 64] [--n-train 1024] [--repeats 2] [--json FILE]
    python bench/split_epoch.py --frozen [--n-train 90000] [--dim 768] [--classes 9] [--batch 64 256] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models import register_model
from torch import nn

from splitfl.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, SplitConfig, TrainConfig
from splitfl.data import ArrayDataset, DataSplits, TaskInfo
from splitfl.engine import make_fabric
from splitfl.split.runner import SplitRunner
from splitfl.train import run

PROBE_MODEL = "splitfl_bench_projection"


def _config(regime: str, args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        regime=regime,
        seed=args.seed,
        data=DataConfig(source="synthetic", modality=args.modality, n_train=args.n_train, n_val=args.n_val,
                        n_test=args.n_val, size=args.size, partition=PartitionConfig(scheme="iid", num_sites=args.hospitals)),
        model=ModelConfig(name=args.model),
        train=TrainConfig(epochs=1, batch_size=args.batch, progress=False, accelerator="cpu"),
        split=SplitConfig(he_preset=args.preset),
    )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    times: dict[str, list[float]] = {"split-plain": [], "split-he": []}
    wire: dict[str, dict[str, float]] = {}
    auroc: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for regime in ("split-plain", "split-he") if rep % 2 == 0 else ("split-he", "split-plain"):
                out = Path(tmp) / f"{regime}-{rep}"
                t0 = time.perf_counter()
                metrics = run(_config(regime, args), out)
                history = (out / "history.csv").read_text().splitlines()
                epoch_seconds = float(history[1].split(",")[history[0].split(",").index("seconds")])
                times[regime].append(epoch_seconds)
                wire[regime] = metrics["wire"]
                auroc[regime] = metrics["val"]["auroc_macro"]
                print(f"{regime:12s} repeat {rep}: epoch {epoch_seconds:.2f} s (whole run {time.perf_counter() - t0:.1f} s)")
    plain, he = statistics.median(times["split-plain"]), statistics.median(times["split-he"])
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "epoch_seconds": {"split-plain": plain, "split-he": he},
        "epoch_seconds_all": times,
        "ratio_he_to_plain": he / plain,
        "bytes_per_sample": {r: {"up": w["bytes_per_sample_up"], "down": w["bytes_per_sample_down"]} for r, w in wire.items()},
        "val_auroc_macro": auroc,
    }


# ---------------------------------------------------------------------------------------------- --frozen


class FrozenProjection(nn.Module):
    """A fixed, seeded random projection of the pixels to ``num_features``: the stand-in for a frozen foundation
    model, so the probe's embeddings come out of the runner's own frozen-encoder cache without an encoder's cost.

    timm's model interface (``forward_features``, ``forward_head``, ``get_classifier``, ``num_features``) lets the
    pooled cut split it like any backbone: the projection is the hospitals' encoder, the classifier the head.
    """

    def __init__(self, num_classes: int = 9, in_chans: int = 1, img_size: int = 28, num_features: int = 768,
                 seed: int = 0, drop_rate: float = 0.0) -> None:
        super().__init__()
        n_in = in_chans * img_size * img_size
        self.num_classes, self.num_features = num_classes, num_features
        self.proj = nn.Linear(n_in, num_features, bias=False)
        with torch.no_grad():  # unit-variance embeddings for unit-variance pixels, whatever the seed of torch
            g = torch.Generator().manual_seed(seed)
            self.proj.weight.copy_(torch.randn(num_features, n_in, generator=g) / math.sqrt(n_in))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes)
        self.pretrained_cfg = {"architecture": PROBE_MODEL, "input_size": (in_chans, img_size, img_size)}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def splitfl_bench_projection(pretrained: bool = False, **kwargs: Any) -> FrozenProjection:
    """timm entry point of :class:`FrozenProjection` (``model.timm_kwargs``: ``num_features``, ``seed``)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's bookkeeping, not ours
        kwargs.pop(key, None)
    return FrozenProjection(**kwargs)


def probe_splits(n_train: int, n_val: int, classes: int, size: int, signal: float, seed: int) -> DataSplits:
    """Grey images of ``classes`` seeded prototypes plus pixel noise (prototype weight ``signal``, noise 1).

    Linearly separable only up to the noise, so the probe's held-out accuracy says whether the head learned.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((classes, size, size)).astype(np.float32)
    task = TaskInfo("probe-embeddings", "multiclass", tuple(f"class{k}" for k in range(classes)), 1)

    def draw(n: int) -> ArrayDataset:
        labels = rng.permutation(np.arange(n) % classes)
        images = np.empty((n, size, size), dtype=np.uint8)
        for start in range(0, n, 10_000):  # bounded float temporaries
            y = labels[start:start + 10_000]
            z = signal * prototypes[y] + rng.standard_normal((len(y), size, size), dtype=np.float32)
            images[start:start + len(y)] = np.clip(np.rint(127.5 + 32.0 * z), 0, 255).astype(np.uint8)
        return ArrayDataset(images, labels, task)

    train, val = draw(n_train), draw(n_val)
    return DataSplits(task, train, val, val, "bench-probe", {"signal": signal})


def _frozen_config(regime: str, batch: int, args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        regime=regime,
        seed=args.seed,
        data=DataConfig(size=args.size, partition=PartitionConfig(scheme="iid", num_sites=args.hospitals)),
        model=ModelConfig(name=PROBE_MODEL, freeze_encoder=True,
                          timm_kwargs={"num_features": args.dim, "seed": args.seed}),
        train=TrainConfig(epochs=1, batch_size=batch, lr=args.lr, progress=False, accelerator="cpu"),
        split=SplitConfig(he_preset=args.preset, cache_embeddings=True),
    )


def _prime_cache(runner: SplitRunner, splits: DataSplits) -> None:
    """Compute every hospital's (and the held-out split's) embeddings once, as a linear probe caches them.

    Goes through the runner's own frozen-encoder cache (``SplitRunner._features``), so the timed epoch reads the
    very tensors a real run trains on and runs no encoder.
    """
    one = torch.zeros(1, dtype=torch.long)
    for dataset in [*runner.sites, splits.val]:
        runner._features(dataset, dataset._x[:1], one)


def frozen_epoch(regime: str, batch: int, splits: DataSplits, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One training epoch of ``regime`` on the cached embeddings (timed alone), then the held-out evaluation."""
    cfg = _frozen_config(regime, batch, args)
    fabric = make_fabric(cfg.train)
    fabric.seed_everything(cfg.seed, verbose=False)  # as run_split: the same initial head in both regimes
    t0 = time.perf_counter()
    runner = SplitRunner(fabric, cfg, splits, out)
    setup = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        _prime_cache(runner, splits)
        cache = time.perf_counter() - t0
        load = [os.getloadavg()[0]]  # the 1-minute load average around the epoch: other jobs on the machine
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        loss = runner.train_epoch(0, f"[{regime}] frozen epoch")
        epoch, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        load.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        val = runner.evaluate(splits.val)
        evaluation = time.perf_counter() - t0
        head = runner.split_model.head.linear_layers()[0]
        samples, extras = runner.train_samples, runner.epoch_extras()
        steps = sum(len(s) // batch if len(s) > batch else 1 for s in runner.sites)
    finally:
        runner.close()
    return {
        "epoch_seconds": epoch,
        "epoch_cpu_seconds": cpu,
        "load_average_before_after": load,
        "samples": samples,
        "steps": steps,
        "samples_per_s": samples / epoch,
        "ms_per_step": 1000 * epoch / steps,
        "bytes_per_sample": {"up": extras["bytes_up"] / samples, "down": extras["bytes_down"] / samples},
        "train_loss": loss,
        "heldout": {"accuracy": val["accuracy"], "auroc_macro": val["auroc_macro"], "loss": val.get("loss"),
                    "n": val["n"]},
        "untimed_seconds": {"setup_and_keys": setup, "embedding_cache": cache, "heldout_evaluation": evaluation},
        "head_weight": head.weight.detach().clone(),
    }


def run_frozen(args: argparse.Namespace) -> dict[str, Any]:
    """The linear-probe epoch in split-plain and split-he, for each batch size, on the same cached embeddings.

    Timed span: ``SplitRunner.train_epoch`` alone, i.e. for every batch the hospital's lookup of the cached
    embeddings, (encryption and) serialisation, the server's parse, checks and head forward (on ciphertexts in
    split-he), the reply's serialisation, (decryption,) the loss, the batch-aggregated head update on the wire and
    the server's optimizer step. Outside it: making the data, building the parties and the consortium's keys,
    computing the embeddings once, the held-out evaluation (each reported under ``untimed_seconds``).
    """
    t0 = time.perf_counter()
    splits = probe_splits(args.n_train, args.n_val, args.classes, args.size, args.signal, args.seed)
    data_seconds = time.perf_counter() - t0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            row: dict[str, Any] = {"batch": batch}
            for regime in ("split-plain", "split-he"):
                row[regime] = frozen_epoch(regime, batch, splits, args, Path(tmp) / f"{regime}-{batch}")
                r = row[regime]
                print(f"batch {batch:4d} {regime:12s} epoch {r['epoch_seconds']:7.2f} s  {r['samples_per_s']:9.0f} "
                      f"samples/s  {r['ms_per_step']:7.2f} ms/step  up {r['bytes_per_sample']['up']:7.0f} B/sample  "
                      f"down {r['bytes_per_sample']['down']:6.0f} B/sample  held-out acc {r['heldout']['accuracy']:.3f} "
                      f"AUROC {r['heldout']['auroc_macro']:.3f}  load {r['load_average_before_after'][0]:.1f}->"
                      f"{r['load_average_before_after'][1]:.1f}", flush=True)
            plain, he = row["split-plain"], row["split-he"]
            row["ratio_he_to_plain"] = he["epoch_seconds"] / plain["epoch_seconds"]
            # split-he trains what split-plain trains, up to CKKS noise (Adam magnifies it where gradients vanish)
            row["head_max_abs_diff"] = float((he.pop("head_weight") - plain.pop("head_weight")).abs().max())
            runs.append(row)
    he_epochs = {r["batch"]: r["split-he"]["epoch_seconds"] for r in runs}
    return {
        "frozen": True,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "frozen", "model", "modality", "repeats")},
        "embeddings": {"n_train": args.n_train, "n_heldout": args.n_val, "dim": args.dim, "classes": args.classes,
                       "encoder": f"frozen fixed random projection of {args.size}x{args.size} synthetic images, "
                                  "computed once into the runner's embedding cache (not timed)",
                       "data_seconds": data_seconds},
        "timed_span": "SplitRunner.train_epoch: one epoch of every hospital's batches (cache lookup, encrypt/serialise, "
                      "server parse+check+head forward, reply, decrypt, loss, head update on the wire, server "
                      "optimizer step); excludes data, keys, embedding cache, held-out evaluation",
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                    "torch_threads": torch.get_num_threads()},
        "runs": runs,
        "split_he_epoch_seconds": he_epochs,
        "best_split_he_epoch_seconds": min(he_epochs.values()),
        "best_batch": min(he_epochs, key=he_epochs.__getitem__),
        "target_seconds": 180.0,
        "meets_target": min(he_epochs.values()) <= 180.0,
    }


def _print_frozen(result: dict[str, Any]) -> None:
    e = result["embeddings"]
    print(f"\nfrozen linear probe: {e['n_train']:,} cached embeddings, d={e['dim']}, K={e['classes']}, "
          f"{result['config']['hospitals']} hospital(s), preset {result['config']['preset']}; "
          f"load average at the end {result['machine']['load_average'][0]:.2f}")
    print(f"  timed: {result['timed_span']}")
    for row in result["runs"]:
        plain, he = row["split-plain"], row["split-he"]
        print(f"  batch {row['batch']}: split-plain {plain['epoch_seconds']:.2f} s ({plain['samples_per_s']:,.0f}/s) | "
              f"split-he {he['epoch_seconds']:.2f} s ({he['samples_per_s']:,.0f}/s), {row['ratio_he_to_plain']:.0f}x | "
              f"split-he bytes/sample up {he['bytes_per_sample']['up']:,.0f} down {he['bytes_per_sample']['down']:,.0f} | "
              f"held-out accuracy {he['heldout']['accuracy']:.3f} (plain {plain['heldout']['accuracy']:.3f}), "
              f"AUROC {he['heldout']['auroc_macro']:.3f} | heads differ by {row['head_max_abs_diff']:.1e}")
    verdict = "met" if result["meets_target"] else "NOT met"
    print(f"  split-he epoch {result['best_split_he_epoch_seconds']:.1f} s at batch {result['best_batch']} "
          f"(target <= 180 s: {verdict})")


# Defaults that differ between the two modes: (image mode, --frozen).
_MODE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "size": (64, 28), "n_train": (1024, 90_000), "n_val": (256, 10_000), "batch": ([64], [64, 256]), "hospitals": (2, 1),
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frozen", action="store_true",
                        help="linear probe on cached embeddings (frozen encoder) instead of image training")
    parser.add_argument("--size", type=int, help="image size in pixels (default 64; --frozen: 28)")
    parser.add_argument("--n-train", type=int, help="training images (default 1024; --frozen: 90000 embeddings)")
    parser.add_argument("--n-val", type=int, help="validation images (default 256; --frozen: 10000 held out)")
    parser.add_argument("--batch", type=int, nargs="+",
                        help="batch size (default 64; --frozen: one epoch per value given, default 64 256)")
    parser.add_argument("--hospitals", type=int, help="hospitals taking turns (default 2; --frozen: 1)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--modality", default="xray")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--repeats", type=int, default=2, help="image mode: epochs per regime (the median is reported)")
    parser.add_argument("--dim", type=int, default=768, help="--frozen: embedding width d")
    parser.add_argument("--classes", type=int, default=9, help="--frozen: classes K")
    parser.add_argument("--signal", type=float, default=0.12,
                        help="--frozen: weight of the class prototype in each synthetic image (pixel noise 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="--frozen: the head's Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    for name, defaults in _MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[args.frozen])
    if args.frozen:
        result = run_frozen(args)
        _print_frozen(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    if len(args.batch) != 1:
        parser.error("--batch takes one value without --frozen")
    args.batch = args.batch[0]
    result = run_benchmark(args)
    e = result["epoch_seconds"]
    print(f"\n{args.model} at {args.size} px, {args.n_train} training + {args.n_val} validation images, batch {args.batch}, "
          f"{args.hospitals} hospitals (median of {args.repeats})")
    print(f"  split-plain epoch {e['split-plain']:.2f} s | split-he epoch {e['split-he']:.2f} s | "
          f"ratio he/plain {result['ratio_he_to_plain']:.2f}x (target <= 1.3x)")
    for regime, b in result["bytes_per_sample"].items():
        print(f"  {regime:12s} bytes per sample: up {b['up']:.0f}, down {b['down']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
