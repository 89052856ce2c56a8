"""Help for every config key, read from the comments beside each dataclass field.

The config dataclasses document each key with a comment (above the field or on its line), which
jsonargparse cannot see. This module reads them once, so ``--help`` and the generated
configuration reference (``docs/configuration.md``) show the same text from one source.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any


@functools.cache
def _own_field_help(cls: type) -> dict[str, str]:
    """Help of each field ``cls`` itself declares: comments above and on its line, then an attribute docstring."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    found: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        n = node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        trailing = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        nxt = body[i + 1] if i + 1 < len(body) else None
        doc = [nxt.value.value] if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                                    and isinstance(nxt.value.value, str)) else []
        found[node.target.id] = " ".join(" ".join(part.split()) for part in above + trailing + doc)
    return found


def field_help(cls: type, name: str) -> str:
    """The help of field ``name``, taken from the class of ``cls``'s MRO that declares it."""
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return _own_field_help(klass).get(name, "")
    return ""


def add_field_help(parser: Any, cls: type, prefix: str = "") -> None:
    """Give each of ``parser``'s actions for ``cls``'s keys (nested dataclasses too) its field's help."""
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = typing.get_type_hints(cls).get(f.name)
        if dataclasses.is_dataclass(tp):
            add_field_help(parser, tp, key + ".")
        elif key in actions and not actions[key].help:
            actions[key].help = field_help(cls, f.name).replace("%", "%%") or None  # argparse formats help with %
