"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from splitfl.config import MEDMNIST_DIR_ENV

# Real MedMNIST files live beside the repository (shared/), never inside it.
_DEFAULT_MEDMNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


@pytest.fixture(scope="session")
def medmnist_dir() -> Path:
    """Folder of real MedMNIST .npz files ($SPLITFL_MEDMNIST_DIR or ../shared/data/medmnist); skips if absent."""
    folder = Path(os.environ.get(MEDMNIST_DIR_ENV) or _DEFAULT_MEDMNIST_DIR)
    if not folder.is_dir():
        pytest.skip(f"real MedMNIST folder not found ({folder}); set {MEDMNIST_DIR_ENV} to run this test")
    return folder


@pytest.fixture(scope="module")
def ctx():
    """A hospitals' CKKS context (secret key included) at the default preset, fresh per test module."""
    from splitfl.he import PRESETS, create_secret_context

    return create_secret_context(PRESETS["default"])


@pytest.fixture(scope="module")
def pub(ctx):
    """The server's view of ``ctx``: the public context, no secret key."""
    from splitfl.he import load_public_context, public_context_bytes

    return load_public_context(public_context_bytes(ctx))


def interrupt_on_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int = 2) -> None:
    """Make ``owner.name`` raise KeyboardInterrupt on its ``call``-th call (Ctrl-C during that epoch).

    Resume tests interrupt a run with it, then ``monkeypatch.undo()`` and run again on the same folder.
    """
    real = getattr(owner, name)
    calls: list[int] = []

    def interrupted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
