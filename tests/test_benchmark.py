"""The latency benchmark must keep running: a tiny configuration, real servers, real output files."""

import json
import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_writes_json_markdown_and_plot(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["server"] for r in data["results"]} == {"naive", "clap-ws auto"}
    for row in data["results"]:
        assert row["sounds"] == 3 and row["p50_ms"] > 0 and row["throughput_per_s"] > 0
        assert 0 <= row["within_budget"] <= 1 and row["model_p50_ms"] > 0 and row["peak_rss_mb"] > 100
    table = (tmp_path / "results.md").read_text()
    assert "| clap-ws, 1 client |" in table and "x baseline" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
