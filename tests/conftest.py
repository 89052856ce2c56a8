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
