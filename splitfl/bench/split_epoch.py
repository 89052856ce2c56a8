"""Side-by-side epoch time of split-plain and split-he on one config.

The encoder dominates a split-learning epoch; this measures what the
encryption adds on top of it, end to end (encoder forward/backward, the
messages, the server head, evaluation of the validation split), with both
regimes run alternately in one process so machine noise hits both alike.

    python bench/split_epoch.py [--size 64] [--n-train 1024] [--repeats 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from splitfl.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, SplitConfig, TrainConfig
from splitfl.train import run


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


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image size (pixels)")
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--n-val", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hospitals", type=int, default=2)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--modality", default="xray")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
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
