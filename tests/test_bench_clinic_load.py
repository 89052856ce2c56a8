"""bench clinic-load, tiny: one real split-he server process under 3 light hospitals, a 3-site FedAvg+HE round."""
from __future__ import annotations

import json

from splitfl.bench.clinic_load import main

ROW_KEYS = {
    "hospitals", "steps", "expected_steps", "step_s_p50", "step_s_p95", "client_step_s_p95", "server_s_p50",
    "steps_per_s", "server_rss_mb_median", "server_rss_mb_peak", "server_threads_peak", "server_connections_peak",
    "errors", "hospital_errors", "failed_processes", "tracebacks", "turn_timeouts", "p95_to_base", "calls",
    "clients_loaded_torch",
}
FED_KEYS = {"sites", "round_s", "updates_submitted", "server_rss_mb_peak", "bytes_up_total", "bytes_down_total", "errors"}


def test_clinic_load_tiny(tmp_path, capsys):
    out = tmp_path / "clinic.json"
    main(["--hospitals", "3", "--rounds", "2", "--batch", "16", "--n-val", "16", "--model", "test_resnet",
          "--fed-sites", "3", "--client-procs", "1", "--min-steps", "0", "--sample-s", "0.1", "--timeout", "120", "--no-progress",
          "--json", str(out)])
    assert "FedAvg+HE round" in capsys.readouterr().out
    r = json.loads(out.read_text())
    (row,) = r["split"]["rows"]
    assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
    assert row["hospitals"] == 3 and row["steps"] == row["expected_steps"] == 6
    assert row["errors"] == 0 and row["failed_processes"] == {} and not row["clients_loaded_torch"], row.get("error_samples")
    assert 0 < row["server_s_p50"] <= row["step_s_p50"] <= row["step_s_p95"]
    assert row["server_rss_mb_peak"] > 100 and row["server_connections_peak"] >= 1
    assert row["calls"]["Forward"]["n"] == 6 and row["calls"]["ApplyUpdate"]["n"] == 6
    fed = r["fed"]
    assert FED_KEYS <= set(fed), FED_KEYS - set(fed)
    assert fed["errors"] == 0 and fed["updates_submitted"] == 3, fed.get("error_samples")
    assert fed["round_s"] > 0 and fed["bytes_up_total"] > 3 * fed["encrypted_params"]
