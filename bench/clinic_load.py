"""Hundreds of clinics: one split-he server under 8-256 light hospitals, a 128-site FedAvg+HE round (see splitfl.bench.clinic_load).

    python bench/clinic_load.py [--hospitals 8 32 128 256] [--rounds 3] [--fed-sites 128] [--json FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from splitfl.bench.clinic_load import main  # noqa: E402

if __name__ == "__main__":
    main()
