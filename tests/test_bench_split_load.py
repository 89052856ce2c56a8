"""bench/split_load.py at N=1,2 with the fewest steps: real server and hospital processes, JSON keys and sane values."""
from __future__ import annotations

import json
import math

from splitfl.bench.split_load import main

ROW_KEYS = {
    "hospitals", "steps_timed", "rounds_timed", "step_s_median", "step_s_p95", "step_s_max", "server_s_median",
    "steps_per_s", "round_s_median", "round_cv", "warmup_round_s", "join_s", "server_cpu_cores", "hospitals_cpu_cores",
    "machine_cpu_cores", "other_cpu_cores", "server_rss_mb_peak", "hospitals_pss_mb_peak_total", "turn_timeouts",
    "sites_skipped", "failed_processes", "run_timed_out", "reconnects", "tracebacks", "errors", "p95_to_base", "stable",
    "load_avg_1min", "step_latencies_s", "round_times_s",
}


def test_split_load_bench_one_and_two_hospitals(tmp_path, capsys):
    out = tmp_path / "load.json"
    main(["--hospitals", "1", "2", "--rounds", "3", "--epochs", "1", "--batch", "16", "--n-val", "16",
          "--model", "test_resnet", "--preset", "small", "--sample-s", "0.2", "--timeout", "120", "--no-progress",
          "--json", str(out)])
    assert "largest stable N" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert {"largest_stable_hospitals", "stability", "rows", "config", "environment"} <= set(r)
    assert [row["hospitals"] for row in r["rows"]] == [1, 2]
    for row in r["rows"]:
        n = row["hospitals"]
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        # 3 rounds of n steps, the first round a warm-up: 2 timed rounds, every step closed, nothing failed.
        assert row["steps_timed"] == 2 * n and row["rounds_timed"] == 2
        assert len(row["step_latencies_s"]) == 2 * n and len(row["round_times_s"]) == 2
        assert row["errors"] == 0 and row["failed_processes"] == {} and not row["run_timed_out"]
        assert 0 < row["server_s_median"] <= row["step_s_median"] <= row["step_s_p95"] <= row["step_s_max"]
        assert row["round_s_median"] >= row["step_s_median"] * n * 0.5
        assert row["steps_per_s"] > 0 and row["join_s"] > 0
        assert row["server_rss_mb_peak"] > 50 and row["hospitals_pss_mb_peak_total"] > 50
        assert row["round_cv"] is None or 0 <= row["round_cv"] < 10
        cpu = row["server_cpu_cores"]
        assert cpu is None or (isinstance(cpu, float) and not math.isnan(cpu) and cpu >= 0)
    assert r["rows"][0]["p95_to_base"] > 0
    assert r["largest_stable_hospitals"] in (0, 1, 2)
