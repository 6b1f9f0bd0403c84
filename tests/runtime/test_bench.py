"""The jaxmint-bench command and the serving benchmark's quick run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmint_runtime.bench import main

REPO = Path(__file__).resolve().parents[2]


def test_bench_reports_latency_throughput_cold_start_and_memory(artifact, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [str(artifact), "--batch-sizes", "1,8", "--seconds", "0.2", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "p99 ms" in text and "examples/s" in text and "cold start" in text
    report = json.loads(out.read_text())
    assert report["model"] == "digits"
    assert [r["batch_size"] for r in report["latency"]] == [1, 8]
    for r in report["latency"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["examples_per_s"] > 0
    cold = report["cold_start"]
    assert cold["process_start_to_first_prediction_s"] > cold["load_s"] > 0
    assert cold["peak_rss_bytes"] > 20 * 2**20


def test_bench_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--no-cold-start"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--batch-sizes", "one,two"])


def test_console_scripts_are_installed():
    for name in ("jaxmint-serve", "jaxmint-bench"):
        script = Path(sys.executable).parent / name
        if not script.exists():
            pytest.skip(f"{name} is not installed next to {sys.executable}")
        out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout


def test_serving_benchmark_quick(artifact, tmp_path):
    out = tmp_path / "serving.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "serving.py"),
        "--quick",
        "--artifact",
        str(artifact),
        "--seconds",
        "0.5",
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    for kind in ("json", "binary"):
        entry = result["throughput"][kind]
        assert entry["batching"]["errors"] == entry["no_batching"]["errors"] == 0
        assert entry["batching"]["requests_per_s"] > 0 and entry["ratio"] > 0
        assert entry["no_batching"]["mean_batch_size"] == 1
    assert result["memory"]["ratio_vs_import_jax"] > 0
    assert result["server_exit_codes"] == {"batching": 0, "no_batching": 0}
    assert "batching / no batching" in run.stdout
