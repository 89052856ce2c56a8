"""Regenerate the committed gRPC/protobuf code in ``splitfl/net/proto/`` from ``protos/``.

Usage (needs the dev extra, ``grpcio-tools``)::

    python -m splitfl.net.codegen            # rewrite splitfl/net/proto/
    python -m splitfl.net.codegen --check    # exit 1 if the committed files are stale

The output depends on the ``grpcio-tools`` version (it stamps the protobuf
and grpcio versions it was made with into the files); regenerate with the
version pinned in ``pyproject.toml``. protoc writes ``import splitfl_pb2``
in the service module; that is rewritten to a package-relative import so the
code works inside ``splitfl.net.proto`` without touching ``sys.path``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "proto"
PROTO_FILES = ("splitfl.proto",)
# Every file protoc writes per .proto file; the test compares exactly these.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class CodegenError(RuntimeError):
    """protoc failed or grpcio-tools is missing."""


def generated_names(proto_files: tuple[str, ...] = PROTO_FILES) -> list[str]:
    """File names protoc generates for ``proto_files`` (without the package ``__init__.py``)."""
    return [Path(f).stem + suffix for f in proto_files for suffix in GENERATED_SUFFIXES]


def _fix_imports(path: Path, modules: list[str]) -> None:
    """``import X_pb2 as ...`` -> ``from . import X_pb2 as ...`` for the modules generated here."""
    text = path.read_text(encoding="utf-8")
    for mod in modules:
        text = text.replace(f"\nimport {mod} as ", f"\nfrom . import {mod} as ")
    path.write_text(text, encoding="utf-8")


def generate(out_dir: Path = OUT_DIR, proto_dir: Path = PROTO_DIR, proto_files: tuple[str, ...] = PROTO_FILES) -> list[Path]:
    """Run ``grpc_tools.protoc`` on ``proto_files`` into ``out_dir``; returns the generated paths."""
    try:
        from grpc_tools import protoc  # lazy: grpcio-tools is a dev-only dependency, absent from a plain install
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CodegenError("grpcio-tools is not installed (pip install -e '.[dev]')") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    # -I protos only (plus protoc's bundled well-known types): descriptor names are then "splitfl.proto",
    # independent of where the repository is checked out, so the output is byte-stable.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *proto_files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise CodegenError(f"protoc failed (exit {rc}) on {', '.join(proto_files)} in {proto_dir}")
    paths = [out_dir / name for name in generated_names(proto_files)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CodegenError(f"protoc did not write {missing}")
    modules = [Path(f).stem + "_pb2" for f in proto_files]
    for p in paths:
        if p.suffix in (".py", ".pyi"):
            _fix_imports(p, modules)
    return paths


def stale_files(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of committed files that differ from a fresh generation (empty: up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh if not (out_dir / p.name).is_file() or (out_dir / p.name).read_bytes() != p.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitfl.net.codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with a fresh generation; exit 1 if stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_files()
            if stale:
                print(f"stale generated code in {OUT_DIR}: {', '.join(stale)}; run python -m splitfl.net.codegen", file=sys.stderr)
                return 1
            print(f"{OUT_DIR} is up to date with {PROTO_DIR}")
            return 0
        for p in generate():
            print(f"wrote {p}")
    except CodegenError as exc:
        print(f"codegen: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
