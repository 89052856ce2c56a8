"""``splitfl compare``: run the regimes on one task and tabulate them side by side.

A compare config is a run config without ``regime`` (the shared base: seed,
data, model, train, split, fed) plus a list of ``variants``, each a name, a
regime and optional dotted-key overrides of the base::

    fed: {local_epochs: 2}
    variants:
      - {name: centralized, regime: centralized}
      - {name: fedavg+dp, regime: fedavg, overrides: {fed.dp_target_epsilon: 8.0}}

Every variant (planned by :mod:`splitfl.variants`) trains into ``<out>/<name>/`` with :func:`splitfl.train.run`, so
each is resumable on its own; a variant whose ``metrics.json`` exists and whose
saved ``config.yaml`` equals its config is reused, not retrained. The table
(``comparison.md``/``.csv``/``.json``) and figure (``comparison.png``) list,
in config order, every variant of the config finished in ``<out>``: test macro
AUROC, its gap to the centralized variant, training time, bytes on the wire per
round and the DP budget.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from splitfl.artifacts import write_csv, write_json, write_text
from splitfl.engine import RunError
from splitfl.plots import plot_comparison
from splitfl.pretrain.runner import pretrain_from_file
from splitfl.runs import is_finished
from splitfl.train import run
from splitfl.units import format_bytes
from splitfl.variants import (
    Cell,
    CompareConfig,
    CompareError,
    PublishedResult,
    Variant,
    parse_only,
    plan_cells,
    pretrain_dir,
)


def _history_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _seconds(rows: list[dict[str, str]]) -> float:
    total = 0.0
    for row in rows:
        try:
            total += float(row.get("seconds") or 0.0)
        except ValueError:
            pass
    return total


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else x


def _site_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """A local run's single institutions: each site's size and test metrics (from metrics.json's ``sites``)."""
    rows = []
    for name, site in sorted((metrics.get("sites") or {}).items(), key=lambda kv: int(kv[0].rpartition("_")[2] or 0)):
        test = site.get("test") or {}
        rows.append({
            "site": name,
            "n_train": site.get("n_train"),
            "test_auroc_macro": _number(test.get("auroc_macro")),
            "test_kappa_quadratic": _number(test.get("kappa_quadratic")),
            "test_grade_mae": _number(test.get("grade_mae")),
        })
    return rows


def read_result(variant: Variant, run_dir: Path, encoder: Optional[str] = None) -> dict[str, Any]:
    """One table row from a finished variant's metrics.json and history.csv."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    regime = metrics.get("regime", variant.regime)
    if regime == "local":  # every site trains in turn: the time is the sum over sites
        histories = [_history_rows(p) for p in sorted((run_dir / "sites").glob("site_*/history.csv"))]
        rows = [r for h in histories for r in h]
        rounds = max((len(h) for h in histories), default=0)
    else:
        rows = _history_rows(run_dir / "history.csv")
        rounds = len(rows)
    wire = metrics.get("wire")
    if wire is None:
        bytes_per_round = 0.0  # centralized / local: nothing crosses a network
    elif wire.get("bytes_per_round") is not None:
        bytes_per_round = float(wire["bytes_per_round"])
    else:
        sent = float(wire.get("train_bytes_up") or 0) + float(wire.get("train_bytes_down") or 0)
        bytes_per_round = sent / max(rounds, 1)
    privacy = metrics.get("privacy") or {}
    test = metrics.get("test") or {}
    sites = _site_rows(metrics) if regime == "local" else []
    if sites:  # the mean of the single institutions, ordinal metrics included
        for key in ("test_kappa_quadratic", "test_grade_mae"):
            vals = [r[key] for r in sites if r[key] is not None]
            test = {**test, key[len("test_"):]: sum(vals) / len(vals) if vals else None}
    return {
        "variant": variant.name,
        "encoder": encoder,
        "regime": regime,
        "overrides": dict(variant.overrides or {}),
        "test_auroc_macro": _number(test.get("auroc_macro")),
        "gap_to_centralized": None,
        "gain_over_single": None,
        "test_accuracy": _number(test.get("accuracy")),
        "test_kappa_quadratic": _number(test.get("kappa_quadratic")),
        "test_grade_mae": _number(test.get("grade_mae")),
        "sites": sites,
        "train_seconds": _seconds(rows),
        "wall_seconds": _number(metrics.get("wall_seconds")),
        "bytes_per_round": bytes_per_round,
        "rounds": rounds,
        "epsilon": _number(privacy.get("epsilon")) if privacy else None,
        "delta": _number(privacy.get("delta")) if privacy else None,
        "task": (metrics.get("task") or {}).get("name"),
        "dir": str(run_dir),
    }


def add_gaps(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Fill ``gap_to_centralized`` and ``gain_over_single``, per encoder; returns the (first) reference row.

    The reference is the variant named ``centralized``, else the first with that regime; the single
    institutions are the ``local`` run's sites, whose mean test AUROC a collaborative regime is compared with.
    """
    first_ref = None
    for encoder in dict.fromkeys(r.get("encoder") for r in rows):
        group = [r for r in rows if r.get("encoder") == encoder]
        candidates = [r for r in group if r["variant"] == "centralized"] or [r for r in group if r["regime"] == "centralized"]
        ref = candidates[0] if candidates else None
        first_ref = first_ref or ref
        ref_auc = ref["test_auroc_macro"] if ref is not None else None
        single = next((r["test_auroc_macro"] for r in group if r["regime"] == "local"), None)
        for row in group:
            auc = row["test_auroc_macro"]
            row["is_reference"] = row is ref
            row["gap_to_centralized"] = auc - ref_auc if auc is not None and ref_auc is not None else None
            collaborative = row["regime"] != "local"
            row["gain_over_single"] = auc - single if collaborative and auc is not None and single is not None else None
    return first_ref


def gains_summary(rows: list[dict[str, Any]], regime: str = "split-he") -> list[dict[str, Any]]:
    """Per encoder: ``regime``'s gain over the mean single institution, in AUROC points and relative."""
    out = []
    for row in rows:
        if row["regime"] != regime or row["gain_over_single"] is None:
            continue
        single = row["test_auroc_macro"] - row["gain_over_single"]
        out.append({
            "encoder": row.get("encoder"),
            "variant": row["variant"],
            "auroc": row["test_auroc_macro"],
            "single_mean_auroc": single,
            "gain_points": 100 * row["gain_over_single"],
            "gain_percent": 100 * row["gain_over_single"] / single if single else None,
        })
    return out


# ----------------------------------------------------------------------------- table and figure


def format_epsilon(row: dict[str, Any]) -> str:
    if row["epsilon"] is None:
        return "—"
    delta = f" (δ = {row['delta']:.0e})" if row["delta"] is not None else ""
    return f"{row['epsilon']:.2f}{delta}"


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown_table(rows: list[dict[str, Any]], reference: dict[str, Any] | None, title: str,
                   published: list[PublishedResult] | None = None) -> str:
    has_ref = reference is not None
    has_enc = any(r.get("encoder") for r in rows)
    has_single = any(r.get("gain_over_single") is not None for r in rows)
    ordinal = any(r.get("test_kappa_quadratic") is not None for r in rows)
    head = (["encoder"] if has_enc else []) + ["variant", "regime", "test macro AUROC"]
    head += ["gap to centralized"] if has_ref else []
    head += ["gain over single (pts)"] if has_single else []
    head += ["QW kappa", "grade MAE"] if ordinal else []
    head += ["training time (s)", "bytes / round (up + down)", "ε (δ)"]
    n_text = 3 if has_enc else 2  # left-aligned text columns
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * n_text + ["---:"] * (len(head) - n_text)) + "|"]
    for r in rows:
        name = r["variant"] + (" (mean of sites)" if r["sites"] else "")
        cells = ([str(r.get("encoder") or "")] if has_enc else []) + [name.replace("|", "\\|"), r["regime"], _fmt(r["test_auroc_macro"], ".4f")]
        if has_ref:
            cells.append("—" if r.get("is_reference") else _fmt(r["gap_to_centralized"], "+.4f"))
        if has_single:
            cells.append(_fmt(None if r["gain_over_single"] is None else 100 * r["gain_over_single"], "+.2f"))
        if ordinal:
            cells += [_fmt(r.get("test_kappa_quadratic"), ".4f"), _fmt(r.get("test_grade_mae"), ".3f")]
        cells += [_fmt(r["train_seconds"], ".1f"), format_bytes(r["bytes_per_round"]), format_epsilon(r)]
        lines.append("| " + " | ".join(cells) + " |")
        for site in r["sites"]:
            sub = ([str(r.get("encoder") or "")] if has_enc else []) + [
                f"↳ {site['site']} (n={site['n_train']})", "single institution", _fmt(site["test_auroc_macro"], ".4f")]
            sub += ["—"] * (int(has_ref) + int(has_single))
            if ordinal:
                sub += [_fmt(site["test_kappa_quadratic"], ".4f"), _fmt(site["test_grade_mae"], ".3f")]
            sub += ["", "", ""]
            lines.append("| " + " | ".join(sub) + " |")
    notes = [
        "",
        "Test macro AUROC of the model selected on validation. "
        + ("Gap: AUROC minus the centralized variant's (negative: below pooling the data). " if has_ref else "")
        + ("Gain over single: AUROC minus the mean of the single institutions (the local run's sites, each "
           "trained alone and tested on the shared test split), in AUROC points. " if has_single else "")
        + ("QW kappa: quadratic-weighted Cohen's kappa of the predicted grade; grade MAE: mean absolute grade "
           "error. " if ordinal else "")
        + "Training time: sum of the per-epoch (round) seconds in history.csv, over all sites for local. "
        "Bytes / round: training traffic per round (FedAvg) or per epoch over every hospital (split learning); "
        "0 where nothing crosses a network. ε: the DP budget spent at the reported δ; — without DP.",
    ]
    gains = gains_summary(rows)
    if gains or published:
        notes += ["", "## Gain of split-he over the mean single institution", "",
                  "| | split-he AUROC | mean single AUROC | gain (AUROC points) | gain (relative) |",
                  "|---|---:|---:|---:|---:|"]
        for g in gains:
            label = f"splitfl, {g['encoder']}" if g["encoder"] else "splitfl"
            notes.append(f"| {label} | {g['auroc']:.4f} | {g['single_mean_auroc']:.4f} | {g['gain_points']:+.2f} | "
                         f"{_fmt(g['gain_percent'], '+.2f')} % |")
        for p in published or []:
            notes.append(f"| {p.source}: {p.task} | {_fmt(p.auroc, '.4f')} | — | — | {_fmt(p.gain_percent, '+.2f')} % |")
    return "\n".join(lines + notes) + "\n"


CSV_COLUMNS = (
    "encoder", "variant", "regime", "test_auroc_macro", "gap_to_centralized", "gain_over_single", "test_kappa_quadratic",
    "test_grade_mae", "train_seconds", "bytes_per_round", "epsilon", "delta", "test_accuracy", "wall_seconds", "rounds",
    "overrides",
)


def write_comparison(rows: list[dict[str, Any]], out: Path, title: str, config_path: str | None = None,
                     published: list[PublishedResult] | None = None) -> dict[str, Path]:
    """comparison.md, .csv, .json and .png in ``out`` (atomic writes); returns their paths."""

    reference = add_gaps(rows)
    paths = {
        "md": write_text(out / "comparison.md", markdown_table(rows, reference, title, published)),
        "csv": write_csv(
            out / "comparison.csv",
            [{**{k: r[k] for k in CSV_COLUMNS if k != "overrides"},
              "overrides": "; ".join(f"{k}={v}" for k, v in r["overrides"].items())} for r in rows],
        ),
        "json": write_json(
            out / "comparison.json",
            {
                "title": title,
                "config": config_path,
                "reference": reference["variant"] if reference is not None else None,
                "reference_test_auroc_macro": reference["test_auroc_macro"] if reference is not None else None,
                "rows": rows,
                "gain_over_single": gains_summary(rows),
                "published": [dataclasses.asdict(p) for p in published or []],
            },
        ),
    }
    ref_auc = reference["test_auroc_macro"] if reference is not None and not any(r.get("encoder") for r in rows) else None
    shown = [{**r, "variant": f"{r['encoder']} · {r['variant']}" if r.get("encoder") else r["variant"]} for r in rows]
    paths["png"] = plot_comparison(shown, out / "comparison.png", title, reference_auroc=ref_auc)
    return paths


# ----------------------------------------------------------------------------- the command


def compare(
    cfg: CompareConfig,
    out: str | Path,
    only: list[str] | None = None,
    config_path: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Pretrain the encoders that ask for it, run (or reuse) every cell, and write the comparison; returns its rows.

    ``only`` restricts which cells are run (variant names, encoder names or ``encoder/variant``); the table lists
    every cell of the config that is finished in ``out`` with its current config.
    """
    out = Path(out)
    cells = plan_cells(cfg, out, only)
    selected = [c for c in cells if c.chosen]
    data = cfg.data
    title = f"{data.flag if data.source == 'medmnist' else f'{data.source} {data.modality}'}: regimes compared"
    pretrain_first = {e.name: e for e in cfg.encoders if e.pretrain is not None}
    for name in dict.fromkeys(c.encoder for c in selected if c.encoder in pretrain_first):
        encoder = pretrain_first[name]
        folder = pretrain_dir(out, encoder)
        if not Path(encoder.pretrain).is_file():
            raise CompareError(f"encoder {name!r}: pretrain config {encoder.pretrain!r} not found (a path relative to "
                               "the folder splitfl compare runs in)")
        log(f"[pretrain] {name}: {encoder.pretrain} into {folder}")
        # torch and Lightning load only when something is trained

        pretrain_from_file(encoder.pretrain, folder)
    trained = 0
    for k, cell in enumerate(selected, 1):
        head = f"[{k}/{len(selected)}] {cell.label} ({cell.variant.regime})"
        if is_finished(cell.run_dir, cell.config):
            log(f"{head}: finished, reusing {cell.run_dir / 'metrics.json'}")
            continue
        log(f"{head}: training into {cell.run_dir}")

        try:
            run(cell.config, cell.run_dir)
        except RunError as exc:
            raise RunError(f"variant {cell.label!r}: {exc}") from exc
        trained += 1
        _write(cells, out, title, config_path, cfg.published)  # partial table after each run: long comparisons show progress
    rows = _write(cells, out, title, config_path, cfg.published)
    skipped = [c.label for c in cells if not c.chosen and not is_finished(c.run_dir, c.config)]
    if skipped:
        log(f"not in the table (no finished run of their current config; not in --only): {', '.join(skipped)}")
    log(f"{trained} trained, {len(selected) - trained} reused; table in {out / 'comparison.md'}")
    return rows


def _write(cells: list[Cell], out: Path, title: str, config_path: str | None,
           published: list[PublishedResult] | None = None) -> list[dict[str, Any]]:
    rows = [read_result(c.variant, c.run_dir, c.encoder) for c in cells if is_finished(c.run_dir, c.config)]
    if rows:
        tasks = {r["task"] for r in rows if r["task"]}
        if len(tasks) == 1:
            title = f"{tasks.pop()}: regimes compared"
        write_comparison(rows, out, title, config_path, published)
    return rows


def cmd_compare(ns: Any) -> None:
    cfg = CompareConfig(**{f.name: ns[f.name] for f in dataclasses.fields(CompareConfig)})
    only = parse_only(ns)
    config_files = ns.get("config") or []
    config_path = str(config_files[-1]) if config_files else None
    compare(cfg, ns.out, only=only, config_path=config_path)
