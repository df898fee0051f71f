"""The benchmarks must keep running: tiny configurations, real servers and indexes, real output files."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import ENGINE_CACHE, ROOT


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_plot(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["server"] for r in data["results"]} == {"naive", "clap-ws auto"}
    for row in data["results"]:
        assert row["sounds"] == 3 and row["p50_ms"] > 0 and row["throughput_per_s"] > 0
        assert 0 <= row["within_budget"] <= 1 and row["model_p50_ms"] > 0 and row["peak_rss_mb"] > 100
    table = (tmp_path / "results.md").read_text()
    assert "| clap-ws, 1 client |" in table and "x baseline" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_ab_runs_two_checkouts_side_by_side():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab.py"), str(ROOT), "--requests", "2",
                             "--seconds", "0.5", "--new-options=--chunk 2", "--", "--max-batch", "4"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "server options --max-batch 4 --untrained, new side also --chunk 2" in result.stdout
    cells = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")]
    rows = {label.strip(): [float(x) for x in values] for label, *values in cells if label.strip()}
    assert set(rows) == {"model p50 ms", "end to end p50 ms", "peak RSS MB"}, result.stdout
    for label, (old, new, ratio) in rows.items():
        assert old > 0 and new > 0, (label, rows)
        assert abs(ratio - new / old) < 0.01, (label, rows)


def run_search_benchmark(tmp_path, *options):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search.py"), "--sizes", "9000",
                             "--queries", "20", "--out", str(tmp_path), *options],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return {r["index"]: r for r in json.loads((tmp_path / "search.json").read_text())["results"]}


def test_search_benchmark_reports_the_float32_baseline_and_an_exact_flat_index(tmp_path):
    rows = run_search_benchmark(tmp_path)
    assert set(rows) == {"f32 scan", "flat", "hnsw"}
    assert rows["flat"]["recall_at_10"] == 1.0  # 9,000 items: one int8 block, pre-scanned, and still exact
    assert rows["flat"]["first_pass"] >= 0.9  # embedding-like data: answered from 64 leading dimensions
    assert rows["hnsw"]["recall_at_10"] >= 0.9 and all(r["p50_ms"] > 0 for r in rows.values())
    assert "| 9,000 | embeddings | flat |" in (tmp_path / "search.md").read_text()
    assert rows["flat"]["prescan"] in ("int8", "int8-7bit") and "cores, AVX" in (tmp_path / "search.md").read_text()
    rows = run_search_benchmark(tmp_path, "--data", "random", "--indexes", "flat")
    assert set(rows) == {"f32 scan", "flat"} and rows["flat"]["data"] == "random"
    assert rows["flat"]["recall_at_10"] == 1.0 and rows["flat"]["first_pass"] == 0  # no subspace to exploit


def test_the_throughput_target_is_judged_on_the_median_of_paired_rounds(monkeypatch):
    spec = importlib.util.spec_from_file_location("latency", ROOT / "benchmarks" / "latency.py")
    latency = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "latency", latency)  # its dataclasses look their module up there
    spec.loader.exec_module(latency)
    runs = [(1, 8.0, 16.0), (2, 6.0, 21.0), (3, 8.0, 24.0)]  # drift: round 2's baseline was slow
    paired = [{"round": r, "name": name, "throughput_per_s": value} for r, base, ours in runs
              for name, value in ((latency.BASELINE, base), ("clap-ws, 16 clients", ours))]
    assert latency.paired_ratios(paired, "clap-ws, 16 clients") == [2.0, 3.5, 3.0]
    sixteen = {"name": "clap-ws, 16 clients", "throughput_per_s": 14.0, "queue_p99_ms": 150.0, "model_p50_ms": 100.0}
    assert latency.targets([sixteen], paired) == [
        ("16 clients: throughput >= 3x the naive baseline",
         "3.00x (median of 3 paired rounds: 2.00, 3.50, 3.00)", True),
        ("16 clients: no sound waits more than 2 batch times (queue p99 / batch time)", "1.50", True)]


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("openvino", "onnxruntime", "onnxscript")),
                    reason="needs the engines: pip install -e '.[engines]'")
def test_engines_benchmark_runs_the_exported_encoder_and_matches_torch(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engines.py"), "--rounds", "1",
                             "--iterations", "1", "--windows", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["engine"].split(" (")[0]: r for r in json.loads((tmp_path / "engines.json").read_text())["results"]}
    assert set(rows) == {"torch fp32", "torch auto", "onnxruntime fp32", "openvino fp32", "openvino auto"}
    assert rows["torch fp32"]["x_torch_fp32"] == 1.0
    assert all(r["ms_per_window_p50"] > 0 and r["x_torch_fp32"] > 0 for r in rows.values())
    for engine in ("onnxruntime fp32", "openvino fp32"):  # the same fp32 network, two windows
        assert rows[engine]["cosine_to_torch_fp32"] >= 0.9999, rows[engine]
    for engine in ("torch auto", "openvino auto"):
        assert rows[engine]["cosine_to_torch_fp32"] >= 0.999, rows[engine]
    table = (tmp_path / "engines.md").read_text()
    assert "| onnxruntime fp32 |" in table and "| openvino fp32 |" in table


@pytest.mark.slow
def test_fairness_benchmark_reports_the_polite_client_beside_a_greedy_one(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fairness.py"), "--rounds", "1",
                             "--sounds", "2", "--in-flight", "8", "--clients", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "fairness.json").read_text())
    assert set(data["results"]) == {"new", "max-batch-ms 0"}  # the latency target, and batches as before it
    for row in data["results"].values():
        assert len(row["beside"]) == 2 and row["throughput"][0] > 0 and row["served"][0] > row["greedy"][0] > 0
    table = (tmp_path / "fairness.md").read_text()
    assert "| new |" in table and "| max-batch-ms 0 |" in table and "cores, " in data["machine"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_engine_auto_benchmark_compares_the_default_with_each_engine(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_auto.py"), "--rounds", "1",
                             "--sounds", "2", "--clients", "2", "--client-sounds", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, CLAP_WS_ENGINE_CACHE=str(ENGINE_CACHE)))
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "engine_auto.md").read_text()
    assert "| --engine torch | torch |" in table and "| 1.00 |" in table  # torch is the ratios' baseline
    assert "auto measured at start (ms per window): {" in table and "cores, " in table


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_engine_parts_benchmark_times_the_front_end_and_the_text_tower_in_both_engines(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_parts.py"), "--precision", "fp32",
                             "--rounds", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.strip("| ").split(" | ") for line in (tmp_path / "engine_parts.md").read_text().splitlines()
            if line.startswith(("| front end", "| text tower"))]
    assert len(rows) == 4 and all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    for row in rows:  # fp32 both ways: the exports compute what torch computes
        agreement = float(row[5].split()[-1])
        assert agreement <= 1e-3 if row[0].startswith("front end") else agreement >= 0.99999


@pytest.mark.slow
def test_web_benchmark_reports_both_paths_and_the_page_weight(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "web.py"), "--items", "500", "--requests", "3",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "web.json").read_text())
    assert {(r["path"], r["case"]) for r in data["rows"]} == {
        (p, c) for p in ("HTTP /api/search", "WebSocket search") for c in ("cached text", "new text", "tag filter")}
    assert all(r["p50_ms"] > 0 and r["requests"] == 3 for r in data["rows"])
    assert 10_000 < data["meta"]["page_bytes"] < 300 * 1024 and "cores" in data["meta"]["machine"]


@pytest.mark.slow
def test_cache_benchmark_compares_both_servers_in_one_run(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cache.py"), "--sounds", "10", "--rounds", "1",
                             "--repeat", "0.5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "cache.json").read_text())
    assert data["rows"]["cache off"]["cached_share"] == 0 and data["rows"]["cache on"]["cached_share"] > 0
    assert data["meta"]["throughput_ratio_median"] > 0 and "cores" in data["meta"]["machine"]


@pytest.mark.slow
def test_python_client_benchmark_compares_the_client_with_raw_websockets():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "python_client.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| round")]
    assert len(rows) == 2 and all(float(raw) > 0 and float(client) > 0 for _, raw, client, _ in rows)
    assert "| median sounds/s |" in result.stdout
