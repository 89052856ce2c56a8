"""The ``splitfl`` command line.

Each subcommand reads the same typed configuration (YAML via ``--config``,
any key overridable as ``--data.size 64``); unknown keys are errors. Errors
a user can fix are printed as one clear line, not a traceback.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from splitfl.compare import CompareError, build_compare_parser, cmd_compare
from splitfl.config import RunConfig



def _user_errors() -> tuple[type[BaseException], ...]:
    from splitfl.data.base import DataError
    from splitfl.models import ModelError
    from splitfl.train import RunError

    from splitfl.net.certs import PkiError

    return (DataError, ModelError, RunError, CompareError, PkiError, FileNotFoundError)


def _run_parser(description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
    parser.add_class_arguments(RunConfig)
    return parser


def to_run_config(ns: Namespace) -> RunConfig:
    """The parsed namespace (already holding dataclass instances) as one RunConfig."""
    return RunConfig(**{f.name: ns[f.name] for f in dataclasses.fields(RunConfig)})


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="splitfl",
        description="Split and federated medical imaging training over CKKS.",
        epilog=f"Benchmarks: splitfl bench {{{','.join(BENCHMARKS)}}} [--help] (see bench/README.md).",
    )
    sub = parser.add_subcommands(dest="command")

    train = _run_parser("Train a model (regimes: centralized, local, split-plain, split-he, fedavg, fedprox) and write metrics.json, history.csv, checkpoints, plots.")
    train.add_argument("--out", type=str, required=True, help="output folder; rerun with the same folder to resume")
    sub.add_subcommand("train", train, help="train a model")
    sub.add_subcommand("compare", build_compare_parser(), help="run several regimes on one task and tabulate them")

    certs = ArgumentParser(description="Make a development CA, a server certificate, one client certificate and token per site.")
    certs.add_argument("--out", type=str, required=True, help="folder for the PKI (ca/, server/, sites/<name>/)")
    certs.add_argument("--sites", type=Optional[int], default=None, help="number of sites (named site-0, site-1, ...)")
    certs.add_argument("--names", type=Optional[list[str]], default=None, help="explicit site names instead of --sites")
    certs.add_argument("--overwrite", type=bool, default=False, help="replace an existing PKI in --out")
    sub.add_subcommand("certs", certs, help="make development certificates and site tokens for mutual TLS")

    data = ArgumentParser(description="Inspect datasets and site partitions.")
    sub.add_subcommand("data", data, help="inspect data and partitions")
    data_sub = data.add_subcommands(dest="action")
    summary = _run_parser("Print the task, split sizes and per-site class counts of the configured data.")
    data_sub.add_subcommand("summary", summary, help="per-site class counts")
    return parser


def cmd_train(ns: Namespace) -> None:
    from splitfl.train import run

    run(to_run_config(ns), ns.out)


def cmd_certs(ns: Namespace) -> None:
    from splitfl.net.certs import cmd_certs as make_certs

    make_certs(ns.out, ns.sites, ns.names, ns.overwrite)


def cmd_data_summary(ns: Namespace) -> None:
    from splitfl.data import load_splits, partition_dataset, summary_table

    cfg = to_run_config(ns)
    splits = load_splits(cfg.data)
    task = splits.task
    print(f"task: {task.name} ({task.task_type}), labels: {', '.join(task.label_names)}, channels: {task.n_channels}")
    print(f"source: {splits.source}")
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        counts = ", ".join(f"{lbl}={c}" for lbl, c in zip(task.label_names, ds.class_counts()))
        print(f"{name:>5}: {len(ds):6d} images  [{counts}]")
    p = cfg.data.partition
    parts = partition_dataset(splits.train, p)
    print(f"\ntraining split over {len(parts)} sites ({p.scheme}, alpha={p.alpha}, seed={p.seed}):")
    print(summary_table(splits.train, parts))


COMMANDS: dict[tuple[str, ...], Callable[[Namespace], None]] = {
    ("train",): cmd_train,
    ("compare",): cmd_compare,
    ("certs",): cmd_certs,
    ("data", "summary"): cmd_data_summary,
}


BENCHMARKS: dict[str, str] = {
    "he-head": "splitfl.he.benchmark",  # encrypted linear head vs plaintext and per-sample ciphertexts
    "split-epoch": "splitfl.split.benchmark",  # split-he epoch vs split-plain epoch, end to end
    "fed-round": "splitfl.he.aggregation_benchmark",  # one FedAvg round: plaintext vs CKKS-encrypted aggregation
}


def cmd_bench(args: list[str]) -> None:
    """``splitfl bench NAME [ARGS]``: the benchmarks in bench/, each with its own --help."""
    import importlib

    if not args or args[0] not in BENCHMARKS:
        names = ", ".join(BENCHMARKS)
        print(f"usage: splitfl bench {{{names}}} [--help] [ARGS]", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(BENCHMARKS[args[0]]).main(args[1:])


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # benchmarks parse their own flags
        cmd_bench(argv[1:])
        return
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    key: tuple[str, ...] = (ns.command,)
    sub_ns = ns[ns.command]
    if ns.command == "data":
        key = ("data", sub_ns.action)
        sub_ns = sub_ns[sub_ns.action]
    try:
        COMMANDS[key](sub_ns)
    except _user_errors() as exc:
        print(f"splitfl {' '.join(key)}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
