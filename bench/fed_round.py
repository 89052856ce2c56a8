"""Benchmark one FedAvg aggregation round, plaintext vs CKKS-encrypted (see splitfl.bench.fed_round).

    python bench/fed_round.py [--sites 4] [--model resnet18] [--repeats 3] [--partial layer4.+fc. fc.] [--json FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from splitfl.bench.fed_round import main

if __name__ == "__main__":
    main()
