"""The package's layers, checked by import-linter against the contract in pyproject.toml.

Data, models and he sit at the bottom; the engine above them; the regimes above the engine;
net, train and the run-reading API above the regimes; compare, bench, attacks and interpret on
top; the CLI over everything. A module importing from a layer above its own breaks the contract.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitfl.cli import COMMANDS, command_handler

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("splitfl", "attacks", "interpret")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} missing: install the dev extras (pip install -e '.[dev]')")
    env = {"PYTHONPATH": str(cwd), "PATH": str(LINT_IMPORTS.parent), "HOME": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_layer_contract_holds() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The check is live: one import from data up to compare, in a copy of the tree, is reported."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    base = tmp_path / "splitfl" / "data" / "base.py"
    base.write_text(base.read_text() + "\nfrom splitfl.compare import compare  # noqa: E402,F401  (upward)\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "splitfl.data.base -> splitfl.compare" in result.stdout, result.stdout


def _function_level_imports(path: Path) -> list[str]:
    """``file:line module (why)`` for every import inside a function or class body that may not be there."""
    text = path.read_text()
    source = text.split("\n")
    tree = ast.parse(text)
    found = []
    for scope in ast.walk(tree):
        if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(scope):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom):  # relative: always the project's own
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            lines = source[node.lineno - 1:node.end_lineno]
            for name in names:
                if name.startswith(".") or name.split(".")[0] in PACKAGES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name} (the project's own)")
                elif not any("# lazy:" in line for line in lines):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name} (no '# lazy: <reason>')")
    return found


def test_no_function_level_imports() -> None:
    """Imports sit at the top of their module: no late import hides a cycle or a missing dependency.

    The project's own modules are never imported inside a function. A third-party module may be, only
    where the import itself must wait (an optional tool, a side effect on import), with the reason in a
    ``# lazy: <reason>`` comment on the import.
    """
    offenders = sorted({hit for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")
                        if "proto" not in path.parts for hit in _function_level_imports(path)})
    assert not offenders, "move these imports to the top of their modules (a cycle means a layer is wrong), or say why they must wait:\n" + \
        "\n".join(offenders)


HEAVY_MODULES = ("torch", "timm", "tenseal", "captum", "lightning", "opacus", "grpc")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["attack", "--help"], ["report", "--help"],
                                  ["compare", "--help"], ["serve", "--help"]])
def test_help_loads_no_heavy_dependency(argv: list[str]) -> None:
    """`splitfl [CMD] --help` builds every parser from torch-free modules: the help never waits on torch."""
    code = ("import sys\nfrom splitfl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"loaded = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
            "print('LOADED', loaded, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "usage:" in proc.stdout
    assert "LOADED []" in proc.stderr, f"splitfl {' '.join(argv)} imported {proc.stderr.strip().splitlines()[-1]}"


def test_every_command_resolves_to_a_function() -> None:
    """The lazy command table names functions that exist (a typo would surface only when a user runs it)."""
    for key in COMMANDS:
        assert callable(command_handler(key)), key


MAX_LINES = 800


def test_no_source_file_outgrows_one_job() -> None:
    """A module over 800 lines holds more than one job: split it by role (generated gRPC code excepted)."""
    long = sorted(f"{path.relative_to(ROOT)}: {n} lines" for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")
                  if "proto" not in path.parts and (n := len(path.read_text().splitlines())) > MAX_LINES)
    assert not long, "split these modules by role:\n" + "\n".join(long)
