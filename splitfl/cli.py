"""The ``splitfl`` command line.

Each subcommand reads the same typed configuration (YAML via ``--config``,
any key overridable as ``--data.size 64``); unknown keys are errors. Errors
a user can fix are printed as one clear line, not a traceback.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from attacks.config import build_attack_parser
from interpret.options import build_report_parser
from splitfl.config import build_train_parser, instantiate, run_config_parser
from splitfl.errors import exit_on_user_error
from splitfl.pretrain.config import build_pretrain_parser
from splitfl.variants import build_compare_parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="splitfl",
        description="Split and federated medical imaging training over CKKS.",
        epilog=f"Benchmarks: splitfl bench {{{','.join(BENCHMARKS)}}} [--help] (see bench/README.md).",
    )
    sub = parser.add_subcommands(dest="command")

    sub.add_subcommand("train", build_train_parser(), help="train a model")
    sub.add_subcommand("compare", build_compare_parser(), help="run several regimes on one task and tabulate them")
    sub.add_subcommand("attack", build_attack_parser(), help="measure what a curious server can reconstruct in each regime")
    sub.add_subcommand("report", build_report_parser(), help="explain a trained model's predictions in an HTML report")

    sub.add_subcommand("pretrain", build_pretrain_parser(), help="self-supervised pretraining of an encoder (MAE, SimCLR)")

    certs = ArgumentParser(description="Make a development CA, a server certificate, one client certificate and token per site.")
    certs.add_argument("--out", type=str, required=True, help="folder for the PKI: ca/ (keep offline), server/ (all the server needs: give it only this folder), "
                       "sites/<name>/ (all one hospital needs: give each only its own)")
    certs.add_argument("--sites", type=Optional[int], default=None, help="number of sites (named site-0, site-1, ...)")
    certs.add_argument("--names", type=Optional[list[str]], default=None, help="explicit site names instead of --sites")
    certs.add_argument("--overwrite", type=bool, default=False, help="replace an existing PKI in --out")
    sub.add_subcommand("certs", certs, help="make development certificates and site tokens for mutual TLS")

    serve = run_config_parser("Run the coordinating server of a federation (fedavg/fedprox; split-* via splitfl.net.split) over gRPC with mutual TLS; writes the same artefacts as `splitfl train`, and resumes from --out.")
    serve.add_argument("--out", type=str, required=True, help="output folder (checkpoint.pt, metrics.json, ...); rerun with the same folder to resume")
    serve.add_argument("--pki", type=str, required=True,
                       help="the server's own folder from `splitfl certs --out DIR`: DIR/server (ca.crt, server.crt, server.key, "
                            "tokens.json; under fed.secure he also consortium.public from `splitfl keys`). Refused if it holds "
                            "a secret the server must not have (the CA key, a consortium secret, a site's key or token)")
    serve.add_argument("--address", type=str, default="127.0.0.1:50051", help="host:port to listen on (port 0: any free port, written to OUT/server.json)")
    serve.add_argument("--insecure", action=ActionYesNo, default=False, help="plaintext gRPC without TLS (development only; prints a warning)")
    serve.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for the sampled sites' updates before dropping the late ones")
    serve.add_argument("--phase-timeout", type=Optional[float], default=None,
                       help="fed.secure masks: seconds each secure-aggregation step after the key advertisement waits for the "
                            "sites (default: --round-timeout); a site that dies mid-round holds the round up this long")
    serve.add_argument("--join-timeout", type=float, default=600.0, help="seconds to wait for every site to join before the first round (split: epoch) this server runs; a site "
                            "that has not joined by then stops the server with an error naming it (raise this if sites start slowly)")
    serve.add_argument("--run-id", type=Optional[str], default=None, help="run id the sites must present (default: regime + config fingerprint)")
    serve.add_argument("--public-context", type=Optional[str], default=None, help="fed.secure he: the consortium's PUBLIC context (default: consortium.public in --pki)")
    sub.add_subcommand("serve", serve, help="run a federation server over gRPC")

    join = run_config_parser("Run one hospital of a federation: join the server, train locally when sampled, submit updates.")
    join.add_argument("--site", type=int, required=True, help="this hospital's index (certificate site-N)")
    join.add_argument("--server", type=str, required=True, help="server host:port")
    join.add_argument("--pki", type=str, required=True,
                      help="this hospital's own folder from `splitfl certs --out DIR`: DIR/sites/site-N (ca.crt, client.crt, "
                           "client.key, token and, from `splitfl keys`, consortium.secret or relay.secret); the whole DIR also works in development")
    join.add_argument("--out", type=str, required=True, help="this hospital's folder (its DP accountant and top-k state)")
    join.add_argument("--insecure", action=ActionYesNo, default=False, help="plaintext gRPC without TLS (development only; prints a warning)")
    join.add_argument("--run-id", type=Optional[str], default=None, help="the server's run id (default: regime + config fingerprint)")
    join.add_argument("--keys", type=Optional[str], default=None, help="the consortium's secret key file (default: consortium.secret, or relay.secret in split-plain, in --pki)")
    join.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to keep retrying while the server is unreachable")
    sub.add_subcommand("join", join, help="run one hospital of a federation over gRPC")

    keys = run_config_parser("Make the keys the configured regime needs, in each party's folder of a `splitfl certs` PKI: the "
                             "hospitals' shared secret PKI/consortium.secret (CKKS secret context of fed.he_preset for fedavg/fedprox "
                             "with fed.secure he, of split.he_preset for split-he, of the `full` preset for split-he-full; "
                             "relay.secret for split-plain with a trainable encoder) with a copy in every PKI/sites/<site>/ folder, "
                             "never the server's; under fed.secure he also the server's PUBLIC context PKI/server/consortium.public. "
                             "Made once and reused; refused for a regime that needs none.")
    keys.add_argument("--pki", type=str, required=True, help="the whole PKI folder from `splitfl certs` (not a party's folder)")
    sub.add_subcommand("keys", keys, help="make the consortium's HE keys (secret for the sites, public for the server)")

    simulate = run_config_parser("Run a federation as real local processes: a dev PKI under OUT/pki, the server and one process per hospital on 127.0.0.1, logs under OUT/logs.")
    simulate.add_argument("--out", type=str, required=True, help="folder for pki/, server/, sites/, logs/")
    simulate.add_argument("--sites", type=Optional[int], default=None, help="number of hospitals (default data.partition.num_sites)")
    simulate.add_argument("--insecure", action=ActionYesNo, default=False, help="plaintext gRPC without TLS (development only; prints a warning)")
    simulate.add_argument("--round-timeout", type=float, default=120.0, help="seconds a round waits for late sites")
    sub.add_subcommand("simulate", simulate, help="run server and hospitals as local processes over gRPC")

    data = ArgumentParser(description="Inspect datasets and site partitions.")
    sub.add_subcommand("data", data, help="inspect data and partitions")
    data_sub = data.add_subcommands(dest="action")
    summary = run_config_parser("Print the task, split sizes and per-site class counts of the configured data.")
    data_sub.add_subcommand("summary", summary, help="per-site class counts")
    return parser


# What each command runs, as "module:function". Every parser above is built from torch-free modules; a
# command's module (which loads torch, timm, TenSEAL, Captum: about 4 s) is imported only when the command
# runs, so `splitfl --help` and `splitfl CMD --help` answer at once. The CLI is the top layer: these are
# lazy imports for start-up time, not a way around the layer contract.
COMMANDS: dict[tuple[str, ...], str] = {
    ("train",): "splitfl.train:cmd_train",
    ("pretrain",): "splitfl.commands:cmd_pretrain",
    ("compare",): "splitfl.compare:cmd_compare",
    ("attack",): "attacks.harness:cmd_attack",
    ("report",): "interpret.report:cmd_report",
    ("certs",): "splitfl.commands:cmd_certs",
    ("serve",): "splitfl.commands:cmd_serve",
    ("join",): "splitfl.commands:cmd_join",
    ("simulate",): "splitfl.commands:cmd_simulate",
    ("keys",): "splitfl.commands:cmd_keys",
    ("data", "summary"): "splitfl.commands:cmd_data_summary",
}


def command_handler(key: tuple[str, ...]) -> Callable[[Namespace], None]:
    """The function that runs command ``key``, imported now (see :data:`COMMANDS`)."""
    module, function = COMMANDS[key].split(":")
    return getattr(importlib.import_module(module), function)


BENCHMARKS: dict[str, str] = {
    "he-head": "splitfl.bench.he_head",  # encrypted linear head vs plaintext and per-sample ciphertexts
    "split-epoch": "splitfl.bench.split_epoch",  # split-he epoch vs split-plain epoch, end to end
    "fed-round": "splitfl.bench.fed_round",  # one FedAvg round: plaintext vs CKKS-encrypted aggregation
    "split-load": "splitfl.bench.split_load",  # concurrent hospitals one split-he server holds (real processes)
    "clinic-load": "splitfl.bench.clinic_load",  # 8-256 lightweight hospitals on one server; a 128-site FedAvg+HE round
}


def cmd_bench(args: list[str]) -> None:
    """``splitfl bench NAME [ARGS]``: the benchmarks in bench/, each with its own --help."""
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
    ns = instantiate(parser, ns)
    key: tuple[str, ...] = (ns.command,)
    sub_ns = ns[ns.command]
    if ns.command == "data":
        key = ("data", sub_ns.action)
        sub_ns = sub_ns[sub_ns.action]
    with exit_on_user_error(f"splitfl {' '.join(key)}"):
        command_handler(key)(sub_ns)


if __name__ == "__main__":
    main()
