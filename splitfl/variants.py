"""The plan of a multi-run job: one base run config, its variants and encoders, expanded into runs.

A compare config (``splitfl compare``) and an attack config (``splitfl attack``) are both a run
config without ``regime`` plus a list of ``variants``, each a name, a regime and dotted-key
overrides of the base, optionally crossed with ``encoders``. This module turns that into one
checked :class:`~splitfl.config.RunConfig` and folder per run, before anything trains, so a typo
in the last variant does not surface hours into the first.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from splitfl.config import (
    DataConfig,
    FedConfig,
    ModelConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
    run_config_from_dict,
)
from splitfl.config_help import add_field_help
from splitfl.errors import UserError

# The regimes a variant can name: exactly those RunConfig.regime accepts.
Regime = typing.get_type_hints(RunConfig)["regime"]

# Files a comparison writes beside its run folders: no variant may take these names.
OUTPUT_FILES = ("comparison.md", "comparison.csv", "comparison.json", "comparison.png")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,99}")


class CompareError(UserError, ValueError):
    """The compare config or the command line cannot be used as given; the message says why."""


@dataclass
class Variant:
    """One row of the comparison: a regime and the keys it changes in the shared base config."""

    name: str  # also the folder <out>/<name>
    regime: Regime  # the run config's regime for this variant
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys of the run config, e.g. fed.secure: he
    # splitfl attack with attack.server: malicious only: the active attack run on this variant (imprint for
    # fedavg; fsha or labels for the split regimes; None: imprint or fsha by regime)
    attack: Optional[str] = None


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
    pretrain: Optional[str] = None  # a `splitfl pretrain` config file to pretrain the encoder with first (None: none)
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

    seed: int = 0  # seed of weight initialisation and batch order
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    variants: list[Variant] = field(default_factory=default_variants)  # the rows of the table, trained in this order
    encoders: list[Encoder] = field(default_factory=list)  # each variant runs with each encoder (empty: the base model)
    published: list[PublishedResult] = field(default_factory=list)  # published figures shown beside the table


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
    active = [v.name for v in cfg.variants if v.attack is not None]
    if active:
        raise CompareError(f"variant(s) {', '.join(map(repr, active))} set 'attack', which only `splitfl attack` reads "
                           "(attack.server: malicious); remove it to compare, or run splitfl attack")
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


def variants_parser(config_cls: type, description: str, config_help: str, only_help: str) -> ArgumentParser:
    """A command line for a config with ``variants`` (``splitfl compare``, ``splitfl attack``): --config, keys, --out, --only."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_class_arguments(config_cls)
    add_field_help(parser, config_cls)
    parser.add_argument("--out", type=str, required=True, help="output folder; rerun with the same folder to resume")
    parser.add_argument("--only", type=str | None, default=None, help=only_help)
    return parser


def build_compare_parser() -> ArgumentParser:
    """``splitfl compare``'s command line."""
    return variants_parser(
        CompareConfig,
        "Run several regimes (variants of one base run config) on the same data, sites and seed, each "
        "into OUT/NAME (resumable; finished variants are reused), and tabulate them in OUT/comparison.{md,csv,json,png}.",
        "YAML: run config keys (no regime) plus 'variants'",
        "comma-separated variant names to run",
    )


def parse_only(ns: Any) -> list[str] | None:
    """``--only a,b`` as a list of names (None: every variant)."""
    return None if ns.only is None else [n.strip() for n in ns.only.split(",") if n.strip()]
