"""How many concurrent hospitals one split-he server holds (see splitfl.bench.split_load).

    python bench/split_load.py [--hospitals 1 2 4 8 16] [--rounds 10] [--epochs 2] [--json FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from splitfl.bench.split_load import main  # noqa: E402

if __name__ == "__main__":
    main()
