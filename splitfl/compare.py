"""``splitfl compare``: run the regimes on one task and tabulate them side by side.

A compare config is a run config without ``regime`` (the shared base: seed,
data, model, train, split, fed) plus a list of ``variants``, each a name, a
regime and optional dotted-key overrides of the base::

    fed: {local_epochs: 2}
    variants:
      - {name: centralized, regime: centralized}
      - {name: fedavg+dp, regime: fedavg, overrides: {fed.dp_target_epsilon: 8.0}}

Every variant trains into ``<out>/<name>/`` with :func:`splitfl.train.run`, so
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
import difflib
import json
import math
import re
import typing
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from splitfl.config import (
    DataConfig,
    with_defaults,
    FedConfig,
    ModelConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
)

# The regimes a variant can name: exactly those RunConfig.regime accepts.
Regime = typing.get_type_hints(RunConfig)["regime"]

OUTPUT_FILES = ("comparison.md", "comparison.csv", "comparison.json", "comparison.png")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,99}")
_DISPLAY_ONLY = {"train": ("progress",)}  # keys that may differ between a finished run and its variant


class CompareError(ValueError):
    """The compare config or the command line cannot be used as given; the message says why."""


@dataclass
class Variant:
    """One row of the comparison: a regime and the keys it changes in the shared base config."""

    name: str  # also the folder <out>/<name>
    regime: Regime
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys of the run config, e.g. fed.secure: he


def default_variants() -> list[Variant]:
    """Every regime once, plus FedAvg with DP-SGD and with encrypted aggregation."""
    return [
        Variant("centralized", "centralized"),
        Variant("local", "local"),
        Variant("fedavg", "fedavg"),
        Variant("fedavg+dp", "fedavg", {"fed.dp_target_epsilon": 8.0}),
        Variant("fedavg+he", "fedavg", {"fed.secure": "he"}),
        Variant("split-plain", "split-plain"),
        Variant("split-he", "split-he"),
    ]


@dataclass
class Encoder:
    """One encoder every variant is run with: overrides of the base model, optionally pretrained first.

    With ``pretrain`` (a ``splitfl pretrain`` config file), the comparison first pretrains it into
    ``<out>/pretrain/<name>/`` (resumable, reused when finished) and sets ``model.pretrained`` to its
    ``encoder.pt``, so one command runs the whole foundation-model comparison.
    """

    name: str  # also the folder <out>/<name>
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted run config keys, e.g. model.freeze_encoder: true
    pretrain: Optional[str] = None
    # where to pretrain (default <out>/pretrain/<name>); a folder shared by several comparisons pretrains once
    pretrain_out: Optional[str] = None


@dataclass
class PublishedResult:
    """A published figure the table is set beside (e.g. FOCAL's gain over single institutions)."""

    source: str  # e.g. "FOCAL (Bian et al., medRxiv 2026)"
    task: str  # what it was measured on, e.g. "DR severity grading"
    auroc: Optional[float] = None  # the collaborative model's macro AUROC
    gain_percent: Optional[float] = None  # its gain over single-institution models, as the paper states it


@dataclass
class CompareConfig:
    """A run config shared by every variant (all keys but ``regime``), the variants, and optionally encoders.

    Without ``encoders`` each variant trains into ``<out>/<variant>/``; with them every variant runs once per
    encoder, into ``<out>/<encoder>/<variant>/``.
    """

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    variants: list[Variant] = field(default_factory=default_variants)
    encoders: list[Encoder] = field(default_factory=list)
    published: list[PublishedResult] = field(default_factory=list)


# ----------------------------------------------------------------------------- variants -> run configs


def _leaf_keys(cls: Any = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, sections included (``fed``, ``fed.secure``, ...)."""
    keys = []
    for name, sub in typing.get_type_hints(cls).items():
        if cls is RunConfig and name == "regime":
            continue
        keys.append(prefix + name)
        if dataclasses.is_dataclass(sub):
            keys += _leaf_keys(sub, f"{prefix}{name}.")
    return keys


def _apply_override(tree: dict[str, Any], key: str, value: Any, variant: str) -> None:
    """Set one dotted ``key`` in the config dict ``tree``, checking it names a RunConfig key."""
    if key == "regime":
        raise CompareError(f"variant {variant!r}: set the regime with 'regime: ...', not in overrides")
    valid = _leaf_keys()
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "keys are dotted run config keys, e.g. fed.secure or train.lr"
        raise CompareError(f"variant {variant!r}: unknown override key {key!r}; {hint}")
    *path, last = key.split(".")
    node = tree
    for part in path:
        node = node[part]
    if isinstance(value, dict) and any(k.startswith(key + ".") for k in valid):  # a whole section: merge its keys
        for k, v in value.items():
            _apply_override(tree, f"{key}.{k}", v, variant)
    else:
        node[last] = value


_RUN_PARSER: ArgumentParser | None = None


def _run_config_parser() -> ArgumentParser:
    global _RUN_PARSER
    if _RUN_PARSER is None:
        _RUN_PARSER = ArgumentParser(exit_on_error=False)
        _RUN_PARSER.add_class_arguments(RunConfig)
    return _RUN_PARSER


def variant_run_config(base: CompareConfig, variant: Variant, encoder: Optional[dict[str, Any]] = None) -> RunConfig:
    """The base config with the encoder's and then the variant's overrides, type-checked like a run config file."""
    shared = dataclasses.asdict(base)
    tree = {f.name: shared[f.name] for f in dataclasses.fields(RunConfig) if f.name != "regime"}
    tree["regime"] = variant.regime
    for key, value in (encoder or {}).items():
        _apply_override(tree, str(key), value, variant.name)
    for key, value in (variant.overrides or {}).items():
        _apply_override(tree, str(key), value, variant.name)
    try:
        return run_config_from_dict(tree)
    except (ArgumentError, TypeError, ValueError) as exc:  # a value of the wrong type or not among the choices
        detail = " ".join(str(exc).split())
        raise CompareError(f"variant {variant.name!r}: invalid overrides {dict(variant.overrides)}: {detail}") from None


def run_config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """A RunConfig from a plain dict (a config file's or a recorded run's), type-checked like ``splitfl train``'s."""
    parser = _run_config_parser()
    ns = parser.parse_object(tree)
    ns = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    return RunConfig(**{f.name: ns[f.name] for f in dataclasses.fields(RunConfig)})


def check_names(variants: list[Variant], what: str = "variant") -> None:
    if not variants:
        raise CompareError(f"the compare config lists no {what}s")
    seen: dict[str, str] = {}
    for v in variants:
        if not _NAME.fullmatch(v.name) or v.name in OUTPUT_FILES:
            raise CompareError(
                f"{what} name {v.name!r} cannot be a folder name: use up to 100 letters, digits and _ . + = - "
                f"(starting with a letter or digit), other than {', '.join(OUTPUT_FILES)}"
            )
        if v.name.lower() in seen:
            same = "is listed twice" if seen[v.name.lower()] == v.name else f"clashes with {seen[v.name.lower()]!r} (folder names ignore case on some systems)"
            raise CompareError(f"{what} name {v.name!r} {same}; {what} names must be unique")
        seen[v.name.lower()] = v.name


def plan(cfg: CompareConfig, only: list[str] | None = None) -> list[tuple[Variant, RunConfig, bool]]:
    """Every variant with its run config and whether to run it (``only``: names to run; None: all).

    Checks everything before any training starts, so a typo in the last variant
    does not surface hours into the first.
    """
    check_names(cfg.variants)
    names = [v.name for v in cfg.variants]
    if only is not None:
        unknown = [n for n in only if n not in names]
        if unknown or not only:
            raise CompareError(f"--only: unknown variant {', '.join(map(repr, unknown)) or '(none given)'}; the variants are: {', '.join(names)}")
    return [(v, variant_run_config(cfg, v), only is None or v.name in only) for v in cfg.variants]


@dataclass
class Cell:
    """One run of a comparison: a variant (with an encoder, or none), its config, folder, and whether to run it."""

    encoder: Optional[str]
    variant: Variant
    config: RunConfig
    run_dir: Path
    chosen: bool

    @property
    def label(self) -> str:
        return self.variant.name if self.encoder is None else f"{self.encoder}/{self.variant.name}"


PRETRAIN_DIR = "pretrain"
PRETRAINED_FILE = "encoder.pt"


def pretrain_dir(out: Path, encoder: Encoder) -> Path:
    """Where a comparison pretrains an encoder: its ``pretrain_out``, else ``<out>/pretrain/<encoder>/``."""
    return Path(encoder.pretrain_out) if encoder.pretrain_out else Path(out) / PRETRAIN_DIR / encoder.name


def plan_cells(cfg: CompareConfig, out: str | Path, only: list[str] | None = None) -> list[Cell]:
    """Every (encoder, variant) run with its config and folder; ``only`` names variants, encoders or ``enc/variant``.

    Checks every config before anything trains, as :func:`plan` does.
    """
    out = Path(out)
    if not cfg.encoders:
        return [Cell(None, v, rc, out / v.name, chosen) for v, rc, chosen in plan(cfg, only)]
    check_names(cfg.variants)
    check_names([Variant(e.name, "centralized") for e in cfg.encoders], what="encoder")
    clash = sorted({e.name.lower() for e in cfg.encoders} & ({v.name.lower() for v in cfg.variants} | {PRETRAIN_DIR}))
    if clash:
        raise CompareError(f"encoder name(s) {clash} clash with a variant name or the folder {PRETRAIN_DIR!r}; rename them")
    cells = []
    for enc in cfg.encoders:
        overrides = dict(enc.overrides or {})
        if enc.pretrain is not None:
            if "model.pretrained" in overrides:
                raise CompareError(f"encoder {enc.name!r}: give either 'pretrain' or a model.pretrained override, not both")
            overrides["model.pretrained"] = str(pretrain_dir(out, enc) / PRETRAINED_FILE)
        for v in cfg.variants:
            cells.append(Cell(enc.name, v, variant_run_config(cfg, v, overrides), out / enc.name / v.name, True))
    if only is not None:
        known = {c.label for c in cells} | {v.name for v in cfg.variants} | {e.name for e in cfg.encoders}
        unknown = [n for n in only if n not in known]
        if unknown or not only:
            raise CompareError(
                f"--only: unknown name {', '.join(map(repr, unknown)) or '(none given)'}; give variant names "
                f"({', '.join(v.name for v in cfg.variants)}), encoder names ({', '.join(e.name for e in cfg.encoders)}) "
                "or encoder/variant"
            )
        for c in cells:
            c.chosen = any(n in (c.label, c.variant.name, c.encoder) for n in only)
    return cells


# ----------------------------------------------------------------------------- results


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    d = _normalised(cfg_dict)
    for section, keys in _DISPLAY_ONLY.items():
        for key in keys:
            (d.get(section) or {}).pop(key, None)
    return d


def is_finished(run_dir: Path, cfg: RunConfig) -> bool:
    """``run_dir`` holds a finished run (metrics.json) of exactly this config (config.yaml).

    A run writes config.yaml when it starts and metrics.json when it ends; a
    config.yaml newer than metrics.json belongs to a later start (perhaps one
    refused for a changed config), so those metrics are not this config's.
    """
    import yaml

    metrics, saved_cfg = run_dir / "metrics.json", run_dir / "config.yaml"
    if not metrics.is_file() or not saved_cfg.is_file() or saved_cfg.stat().st_mtime_ns > metrics.stat().st_mtime_ns:
        return False
    try:
        saved = yaml.safe_load(saved_cfg.read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(saved, dict):
        return False
    # Keys added to splitfl after that run were at their defaults in it (a new key's default keeps old behaviour).
    saved = with_defaults(saved, _normalised(dataclasses.asdict(RunConfig())))
    return _comparable(saved) == _comparable(dataclasses.asdict(cfg))


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


def format_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if n == 0:
        return "0"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


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
    from splitfl.artifacts import write_csv, write_json, write_text
    from splitfl.plots import plot_comparison

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
        from splitfl.pretrain.runner import pretrain_from_file

        pretrain_from_file(encoder.pretrain, folder)
    trained = 0
    for k, cell in enumerate(selected, 1):
        head = f"[{k}/{len(selected)}] {cell.label} ({cell.variant.regime})"
        if is_finished(cell.run_dir, cell.config):
            log(f"{head}: finished, reusing {cell.run_dir / 'metrics.json'}")
            continue
        log(f"{head}: training into {cell.run_dir}")
        from splitfl.train import RunError, run

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


def variants_parser(config_cls: type, description: str, config_help: str, only_help: str) -> ArgumentParser:
    """A command line for a config with ``variants`` (``splitfl compare``, ``splitfl attack``): --config, keys, --out, --only."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_class_arguments(config_cls)
    parser.add_argument("--out", type=str, required=True, help="output folder; rerun with the same folder to resume")
    parser.add_argument("--only", type=str | None, default=None, help=only_help)
    return parser


def parse_only(ns: Any) -> list[str] | None:
    """``--only a,b`` as a list of names (None: every variant)."""
    return None if ns.only is None else [n.strip() for n in ns.only.split(",") if n.strip()]


def build_compare_parser() -> ArgumentParser:
    return variants_parser(
        CompareConfig,
        "Run several regimes (variants of one base run config) on the same data, sites and seed, each "
        "into OUT/NAME (resumable; finished variants are reused), and tabulate them in OUT/comparison.{md,csv,json,png}.",
        "YAML: run config keys (no regime) plus 'variants'",
        "comma-separated variant names to run",
    )


def cmd_compare(ns: Any) -> None:
    cfg = CompareConfig(**{f.name: ns[f.name] for f in dataclasses.fields(CompareConfig)})
    only = parse_only(ns)
    config_files = ns.get("config") or []
    config_path = str(config_files[-1]) if config_files else None
    compare(cfg, ns.out, only=only, config_path=config_path)
