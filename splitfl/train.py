"""One training job of any regime, in-process: pick the regime's runner, load the data, write the results.

Run it as ``splitfl train --config FILE --out DIR`` or with
Lightning's launcher::

    fabric run splitfl/train.py --config configs/quickstart.yaml --out runs/quickstart

Every epoch writes an atomic checkpoint; rerunning the same command on the
same ``--out`` resumes from it and reproduces the uninterrupted run.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # launched as a script (fabric run / torchrun): don't let splitfl/* shadow top-level modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import time
from typing import Any, Optional

from splitfl.central import run_centralized, run_local
from splitfl.config import (
    RunConfig,
    build_train_parser,
    instantiate,
    run_config_from_namespace,
)
from splitfl.data import load_splits
from splitfl.engine import (
    RunError,
    launched_by_fabric_cli,
    make_fabric,
    write_run_metrics,
)
from splitfl.errors import exit_on_user_error
from splitfl.fed.runner import run_fed
from splitfl.split.runner import run_split

REGIMES = {
    "centralized": run_centralized,
    "local": run_local,
    "split-plain": run_split,
    "split-he": run_split,
    "split-he-full": run_split,
    "fedavg": run_fed,
    "fedprox": run_fed,
}


def run(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Run one training job and write its artefacts to ``out``; returns what metrics.json holds."""
    if cfg.regime not in REGIMES:
        raise RunError(f"regime {cfg.regime!r} is not a plaintext training regime; choose one of {sorted(REGIMES)}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fabric = make_fabric(cfg.train)
    if not launched_by_fabric_cli():  # under `fabric run` the launcher has already started the processes
        fabric.launch()
    t0 = time.perf_counter()
    splits = load_splits(cfg.data)
    fabric.print(
        f"task {splits.task.name} ({splits.task.task_type}, {splits.task.num_outputs} outputs): "
        f"train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)}; regime {cfg.regime}; "
        f"device {fabric.device}"
    )
    result = REGIMES[cfg.regime](fabric, cfg, splits, out_dir)
    return write_run_metrics(cfg, splits, result, t0, out_dir, fabric.print if fabric.is_global_zero else None)


def cmd_train(ns: Any) -> None:
    run(run_config_from_namespace(ns), ns.out)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point for ``fabric run splitfl/train.py --config FILE --out DIR``."""
    parser = build_train_parser()
    ns = instantiate(parser, parser.parse_args(sys.argv[1:] if argv is None else argv))
    with exit_on_user_error("splitfl train"):
        cmd_train(ns)


if __name__ == "__main__":
    main()
