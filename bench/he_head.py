"""Benchmark the encrypted linear head of split-he (see splitfl.bench.he_head).

    python bench/he_head.py [--json FILE] [--batch 64 --dim 512 --classes 5] [--preset default]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from splitfl.bench.he_head import main  # noqa: E402

if __name__ == "__main__":
    main()
