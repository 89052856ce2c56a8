"""The configuration reference (docs/configuration.md), rendered from the config dataclasses.

Keys, types and defaults live in the dataclasses; a hand-written table would drift from them, so this module
walks them (``dataclasses.fields``, ``typing.get_type_hints``) and tests/test_config_reference.py fails when the
committed file differs from what it renders. Help text is the comment documenting each field in its dataclass
(``# ...`` on the field's line and/or the comment lines directly above it, or an attribute docstring below it),
because that is how this code base documents keys; jsonargparse shows none of them in ``--help``, so this file
is where users read them.

    python -m splitfl.config_reference > docs/configuration.md        # regenerate
    python -m splitfl.config_reference --check docs/configuration.md  # exit 1 if stale
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from attacks.config import AttackConfig
from splitfl.config import RunConfig
from splitfl.config_help import field_help
from splitfl.pretrain.config import PretrainConfig
from splitfl.variants import CompareConfig

REGENERATE = "python -m splitfl.config_reference > docs/configuration.md"


@dataclass(frozen=True)
class Section:
    """One kind of config file: the dataclass it is parsed into and the commands that read it."""

    title: str
    commands: str
    cls: type
    base: Section | None = None  # keys identical to the base's are listed there only


RUN = Section("Run config", "`splitfl train`, `serve`, `join`, `simulate`, `keys`, `data summary`", RunConfig)
COMPARE = Section("Compare config", "`splitfl compare`", CompareConfig, base=RUN)
ATTACK = Section("Attack config", "`splitfl attack`", AttackConfig, base=COMPARE)
PRETRAIN = Section("Pretrain config", "`splitfl pretrain`", PretrainConfig)
SECTIONS: tuple[Section, ...] = (RUN, COMPARE, ATTACK, PRETRAIN)


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    help: str


@dataclass
class Group:
    """The leaf keys of one dataclass (a table), e.g. ``train`` or the items of ``variants[]``."""

    prefix: str
    summary: str
    rows: list[Row]
    default_block: str | None = None  # YAML of a list-of-dataclass default too long for its row


def _is_dataclass_list(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is list and len(args) == 1 and dataclasses.is_dataclass(args[0])


def type_name(tp: Any) -> str:
    """A readable type: ``int``, ``str | None``, ``Literal['a', 'b']`` as ``a | b``, ``list[str]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _plain(value: Any) -> Any:
    """Dataclasses as dicts and tuples as lists, which is how a YAML file holds them."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def yaml_value(value: Any, flow: bool = True) -> str:
    """``value`` as it would be written in a config file (``null``, ``true``, ``1.0e-05``, ``[0.9, 0.95]``)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=flow, sort_keys=False, width=10**6)
    return text.removesuffix("...\n").strip()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _summary(cls: type) -> str:
    """The first paragraph of a class docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def groups(cls: type, prefix: str = "") -> list[Group]:
    """One group per dataclass under ``cls``: its own leaves, then nested sections and list items, in field order."""
    hints = typing.get_type_hints(cls)
    own = Group(prefix, _summary(cls), [])
    nested: list[Group] = []
    for f in dataclasses.fields(cls):
        tp, default, key = hints[f.name], _default(f), prefix + f.name
        if dataclasses.is_dataclass(tp):
            nested += groups(tp, key + ".")
            continue
        shown = "*required*" if default is dataclasses.MISSING else _code(yaml_value(default))
        block = None
        if _is_dataclass_list(tp) and default:
            shown, block = "see below", yaml_value(default, flow=False)
        own.rows.append(Row(key, type_name(tp), shown, field_help(cls, f.name)))
        if _is_dataclass_list(tp):
            items = groups(typing.get_args(tp)[0], key + "[].")
            if block:
                items[0].default_block = f"{key}:\n{textwrap.indent(block, '  ')}"
            nested += items
    return [own, *nested] if own.rows else nested


def _code(text: str) -> str:
    """A code span in a table cell: only ``|`` needs escaping there."""
    return "`" + text.replace("|", "\\|") + "`"


def _prose(text: str) -> str:
    """Help text in a table cell, so ``<out>`` is not taken for HTML nor ``fc.*`` for emphasis (backticks stay code)."""
    for ch in "\\|<*":
        text = text.replace(ch, "\\" + ch)
    return text


def _table(group: Group) -> list[str]:
    lines = ["| Key | Type | Default | Help |", "|---|---|---|---|"]
    lines += [f"| `{r.key}` | {_code(r.type)} | {r.default} | {_prose(r.help)} |" for r in group.rows]
    if group.default_block:
        lines += ["", "Default:", "", "```yaml", group.default_block, "```"]
    return lines


def render_section(section: Section) -> list[str]:
    """A section: what reads it, then a table per group, leaving out rows identical to the base section's."""
    lines = [f"## {section.title}", "", f"Read by {section.commands}."]
    mine = groups(section.cls)
    if section.base is not None:
        base_rows = {r for g in groups(section.base.cls) for r in g.rows}
        base_keys = {r.key for r in base_rows}
        keys = {r.key for g in mine for r in g.rows}
        missing = sorted(base_keys - keys)
        except_ = f" except {', '.join(f'`{k}`' for k in missing)}" if missing else ""
        lines[-1] += (f" It takes every key of the {section.base.title.lower()}{except_}, with the same type, default "
                      "and meaning; the tables below list only the keys it adds or changes.")
        mine = [dataclasses.replace(g, rows=[r for r in g.rows if r not in base_rows]) for g in mine]
    for g in mine:
        if not g.rows:
            continue
        title = f"`{g.prefix.rstrip('.')}`" if g.prefix else "Top level"
        lines += ["", f"### {title}", ""]
        if g.summary:
            lines += [g.summary, ""]
        lines += _table(g)
    return lines


def render_reference() -> str:
    """The whole reference as Markdown (the exact content of docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        (f"> Generated from the config dataclasses by `splitfl/config_reference.py`; do not edit by hand. "
         f"Regenerate with `{REGENERATE}`."),
        "",
        "Every key a YAML config file can set, in dotted form: `train.lr` is `lr` under `train:`, and",
        "`--train.lr 0.01` on the command line. `name[].key` is a key of each item of the list `name`.",
        "Unknown keys are errors. Command-line-only options (`--out`, `--only`, ...) and `splitfl report`,",
        "which takes no config file, are listed by `splitfl <command> --help`.",
    ]
    for section in SECTIONS:
        lines += ["", *render_section(section)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the configuration reference (Markdown).")
    parser.add_argument("--check", metavar="FILE", help="exit 1, showing the difference, if FILE is not up to date")
    args = parser.parse_args(argv)
    text = render_reference()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    current = path.read_text() if path.is_file() else ""
    if current == text:
        return 0
    diff = difflib.unified_diff(current.splitlines(keepends=True), text.splitlines(keepends=True),
                                fromfile=str(path), tofile="rendered")
    sys.stderr.writelines(list(diff)[:80])
    print(f"\n{path} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
