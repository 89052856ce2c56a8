"""Benchmark one split-he epoch against one split-plain epoch (see splitfl.bench.split_epoch).

    python bench/split_epoch.py [--size 64] [--n-train 1024] [--repeats 2] [--json FILE]
    python bench/split_epoch.py --frozen [--n-train 90000] [--dim 768] [--classes 9] [--batch 64 256] [--json FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from splitfl.bench.split_epoch import main  # noqa: E402

if __name__ == "__main__":
    main()
