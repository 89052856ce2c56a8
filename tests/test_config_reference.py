"""docs/configuration.md is generated from the config dataclasses; these tests keep it from drifting.

The key walk here is written independently of splitfl.config_reference, so a key the renderer skipped
(or a config class it forgot) fails (b) even when the committed file matches the renderer.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from attacks.config import AttackConfig
from splitfl.config import RunConfig
from splitfl.config_reference import REGENERATE, main, render_reference
from splitfl.pretrain.config import PretrainConfig
from splitfl.variants import CompareConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
CONFIGS = (RunConfig, CompareConfig, AttackConfig, PretrainConfig)


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted leaf keys; nested dataclasses flattened, a list of dataclasses as ``name`` plus ``name[].key``."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{name}.")
            continue
        keys.append(prefix + name)
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            keys += leaf_keys(args[0], f"{prefix}{name}[].")
    return keys


def table_rows(text: str) -> dict[str, list[str]]:
    """Key -> cells of every table row (cells split on unescaped pipes)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows.setdefault(cells[0].strip("`"), cells)
    return rows


@pytest.fixture(scope="module")
def reference() -> str:
    return render_reference()


def test_committed_reference_is_up_to_date(reference: str) -> None:
    assert DOC.is_file(), f"{DOC} is missing; generate it with: {REGENERATE}"
    assert DOC.read_text() == reference, f"{DOC} is out of date with the config dataclasses; regenerate it with: {REGENERATE}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_leaf_key_is_documented(cls: type, reference: str) -> None:
    rows = table_rows(reference)
    missing = [k for k in leaf_keys(cls) if k not in rows]
    assert not missing, f"{cls.__name__} keys missing from the reference: {missing}"


def test_every_row_has_help(reference: str) -> None:
    rows = table_rows(reference)
    assert len(rows) > 100
    empty = [key for key, cells in rows.items() if len(cells) != 4 or not cells[3]]
    assert not empty, f"rows without help (add a # comment to the field in its dataclass): {empty}"


def test_check_flags_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: str) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(reference.replace("| `train.lr` |", "| `train.learning_rate` |"))
    assert main(["--check", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and REGENERATE in err
    stale.write_text(reference)
    assert main(["--check", str(stale)]) == 0
