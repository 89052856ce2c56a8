"""What each ``splitfl`` subcommand does once its command line is parsed (the ones without a module of their own).

:mod:`splitfl.cli` builds the parsers from torch-free modules and imports this
module only when one of these commands runs, so ``splitfl --help`` stays fast.
"""
from __future__ import annotations

from jsonargparse import Namespace

from splitfl.config import run_config_from_namespace
from splitfl.data import load_splits, partition_dataset, summary_table
from splitfl.net.certs import cmd_certs as make_certs
from splitfl.net.launch import join, make_consortium_keys, serve, simulate
from splitfl.pretrain.config import config_from_namespace
from splitfl.pretrain.runner import run as pretrain


def cmd_pretrain(ns: Namespace) -> None:
    pretrain(config_from_namespace(ns), ns.out)


def cmd_serve(ns: Namespace) -> None:
    serve(run_config_from_namespace(ns), ns.out, ns.pki, ns.address, ns.insecure, round_timeout=ns.round_timeout,
          join_timeout=ns.join_timeout, run_id=ns.run_id, public_context=ns.public_context, phase_timeout=ns.phase_timeout)


def cmd_join(ns: Namespace) -> None:
    join(run_config_from_namespace(ns), ns.site, ns.server, ns.pki, ns.out, ns.insecure, run_id=ns.run_id, keys=ns["keys"],
         connect_timeout=ns.connect_timeout)


def cmd_keys(ns: Namespace) -> None:
    cfg = run_config_from_namespace(ns)
    made = make_consortium_keys(ns.pki, cfg)
    kind = (f"CKKS secret context, preset {made.preset} ({made.what})" if made.preset else
            "relay sealing key; split-plain uses no HE keys")
    print(f"{cfg.regime}: hospitals' shared key {made.key_file}  ({kind}; never give it to the server)")
    for copy in made.site_copies:
        print(f"  copy in {copy.parent.name}'s folder: {copy}")
    if made.public is not None:
        print(f"server's public context {made.public}  (in the server's folder)")
    elif made.preset:
        print("server: nothing to add: the split server receives the public context from a hospital at run time")


def cmd_simulate(ns: Namespace) -> None:
    metrics = simulate(run_config_from_namespace(ns), ns.out, ns.sites, ns.insecure, round_timeout=ns.round_timeout)
    print(f"simulate: test macro AUROC {metrics['test']['auroc_macro']:.4f}; server results in {ns.out}/server/metrics.json")


def cmd_certs(ns: Namespace) -> None:
    make_certs(ns.out, ns.sites, ns.names, ns.overwrite)


def cmd_data_summary(ns: Namespace) -> None:
    cfg = run_config_from_namespace(ns)
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
