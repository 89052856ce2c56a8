"""bench/split_epoch.py --frozen at toy size: the real split-plain and split-he parties, JSON keys and sane values."""
from __future__ import annotations

import json

from splitfl.bench.split_epoch import main

REGIME_KEYS = {
    "epoch_seconds", "epoch_cpu_seconds", "load_average_before_after", "samples", "steps", "samples_per_s", "ms_per_step", "bytes_per_sample",
    "train_loss", "heldout", "untimed_seconds",
}


def test_frozen_probe_epoch_split_plain_and_split_he(tmp_path, capsys):
    out = tmp_path / "frozen.json"
    main(["--frozen", "--n-train", "512", "--n-val", "128", "--dim", "32", "--classes", "3", "--batch", "64",
          "--signal", "0.5", "--json", str(out)])
    assert "split-he epoch" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["frozen"] is True and r["embeddings"]["dim"] == 32 and r["embeddings"]["classes"] == 3
    assert {"timed_span", "machine", "runs", "split_he_epoch_seconds", "best_batch", "meets_target"} <= set(r)
    (row,) = r["runs"]
    assert row["batch"] == 64
    for regime in ("split-plain", "split-he"):
        res = row[regime]
        assert REGIME_KEYS <= set(res), REGIME_KEYS - set(res)
        assert res["samples"] == 512 and res["steps"] == 8  # one hospital, 512 / 64 batches, nothing dropped
        assert 0 < res["epoch_seconds"] and res["samples_per_s"] > 0
        assert res["bytes_per_sample"]["up"] > 0 and res["bytes_per_sample"]["down"] > 0
        assert res["heldout"]["n"] == 128 and 0.0 <= res["heldout"]["accuracy"] <= 1.0
        assert res["heldout"]["auroc_macro"] > 0.6  # the probe learns from one toy epoch
    # Ciphertexts are larger than float32 activations, and split-he trains what split-plain trains (CKKS noise aside).
    assert row["split-he"]["bytes_per_sample"]["up"] > row["split-plain"]["bytes_per_sample"]["up"]
    assert row["head_max_abs_diff"] < 1e-4
    assert r["split_he_epoch_seconds"] == {"64": row["split-he"]["epoch_seconds"]}
