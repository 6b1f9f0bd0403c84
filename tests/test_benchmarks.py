"""Every benchmark script still runs: its quick mode, end to end (timings are not checked)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args, timeout=600, devices=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_overhead_quick(tmp_path, model):
    run("benchmarks/overhead.py", "--quick", "--model", model, "--out", tmp_path / "o.json")
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["config"]["model"].startswith(model)
    assert result["a_fit_vs_hand"]["ratio"] > 0 and result["c_bare_steps"]["ratio"] > 0
    assert result["c_bare_steps"]["hand_with_guard_ratio"] > 0
    assert result["a_fit_vs_hand"]["fit_fixed_seconds_per_call"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["wide", "transformer"])
def test_checkpoint_quick(tmp_path, model):
    out = run("benchmarks/checkpoint.py", "--quick", "--model", model, "--out", tmp_path / "c.json")
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["throughput"]["ratio"] > 0 and result["throughput"]["periodic_saves_timed"] > 0
    assert result["config"]["model"].startswith("mlp" if model == "wide" else model)
    assert (result["resume"] is None) == (model != "wide")
    assert ("seconds from spawn" in out) == (model == "wide")


@pytest.mark.slow
def test_cold_start_quick():
    out = run("benchmarks/cold_start.py", "--quick")
    assert "ratio a/b" in out


@pytest.mark.slow
def test_restart_quick(tmp_path):
    run("benchmarks/restart.py", "--quick", "--out", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())["digits_mlp"]
    assert result["a_median"] > 0 and result["b_median"] > 0 and result["ratio_b_over_a"] > 0


@pytest.mark.slow
def test_scaling_quick():
    out = run("benchmarks/scaling.py", "--quick", "--devices", "4")
    assert "pmap" in out and "fsdp" in out


@pytest.mark.slow
def test_gpu_transformer_tiny_on_cpu_on_a_mesh_with_scanned_layers(tmp_path):
    args = ["--size", "tiny", "--remat", "full", "--mesh", "fsdp=2,tensor=2", "--scan-layers"]
    run("benchmarks/gpu_transformer.py", *args, "--out", tmp_path / "g.json", devices=4)
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["params"] > 0 and result["mfu"] is None  # no peak known for a CPU
    assert result["remat"] == "full" and np.isfinite(result["final_loss"])
    assert result["mesh"] == "fsdp=2,tensor=2" and result["scan_layers"] is True
    assert result["devices"] == 4 and result["peak_bytes_per_device"] is None  # CPU: no stats


@pytest.mark.slow
def test_sweep_overhead_quick(tmp_path):
    run("benchmarks/sweep_overhead.py", "--quick", "--out", tmp_path / "s.json")
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["trials"] == 2 and result["sweep_2_workers_s"] > 0


@pytest.mark.slow
def test_diagnose_overhead_quick():
    out = run("benchmarks/diagnose_overhead.py", "--quick")
    assert "ratio" in out


@pytest.mark.slow
def test_backends_quick(tmp_path):
    out = run("benchmarks/backends.py", "--quick", "--out", tmp_path / "b.json")
    assert "batch-1 latency" in out and "serving peak RSS" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["batch1_latency_us"]) == {"xla", "onnx", "iree"}
    # Both shipped experiments export to every target.
    assert result["transformer_targets"] == {"written": ["xla", "onnx", "iree"], "skipped": {}}


def test_http_parsers_quick(tmp_path):
    run("benchmarks/http_parsers.py", "--quick", "--out", tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text())["us_per_request"]


def test_data_quick(tmp_path):
    out = run("benchmarks/data.py", "--quick", "--out", tmp_path / "d.json")
    assert "target (a): grain_npy / memory" in out
    result = json.loads((tmp_path / "d.json").read_text())
    assert set(result["over_memory"]) == {
        "grain_npy",
        "grain_npy_1_worker",
        "grain_arrayrecord",
        "grain_parquet",
    }
    assert result["larger_than_memory"]["big"]["steps_per_sec"] > 0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install -y wrk)")
def test_grpc_rest_quick(tmp_path):
    out = run("benchmarks/grpc_rest.py", "--quick", "--out", tmp_path / "g.json")
    assert "gRPC/REST" in out
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["connections"]["8"]["grpc"]["requests_per_s"] > 0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install -y wrk)")
def test_batching_quick(tmp_path):
    out = run("benchmarks/batching.py", "--quick", "--out", tmp_path / "b.json")
    assert "vs no batching" in out
    onnx = json.loads((tmp_path / "b.json").read_text())["summary"]["onnx"]
    assert set(onnx) == {"no batching", "worker thread", "default"}
    # --batch-on auto times the digits MLP's batch (microseconds) and picks the loop
    assert [onnx[v]["batch_on"] for v in onnx] == ["thread", "thread", "loop"]
    assert all(row["requests_per_s"] > 0 and row["cpu_us_per_request"] > 0 for row in onnx.values())


PEER = Path.home() / ".cache/jaxmint-bench/mlserver-1.7.1/bin/mlserver"


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("wrk") is None or not PEER.exists(),
    reason="needs wrk and MLServer (python benchmarks/serving_peers.py installs it)",
)
def test_serving_peers_quick(tmp_path):
    out = run("benchmarks/serving_peers.py", "--quick", "--out", tmp_path / "p.json")
    assert "the peer's req/s" in out
    result = json.loads((tmp_path / "p.json").read_text())
    assert set(result["ratios"]) == {"onnx", "xla"}
    assert result["summary"]["MLServer 1.7.1"]["64"]["requests_per_s"] > 0


def test_memory_quick(tmp_path):
    args = [
        "--quick",
        "--scan-layers",
        "--mesh-remat",
        "full",
        "--chunked-ce",
        "--chunked-attention",
    ]
    out = run("benchmarks/memory.py", *args, "--out", tmp_path / "m.json")
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["scan_layers"] is True and result["mesh_remat"] == "full"
    assert result["chunked_ce"] is True and result["chunked_attention"] is True
    assert set(result["meshes"]) == {"data=8", "fsdp=8", "fsdp=2,tensor=4", "fsdp=4,tensor=2"}
    # each device holds a slice of the state on a model-parallel mesh, all of it on data=8
    meshes = result["meshes"]
    assert meshes["fsdp=8"]["arguments"] < 0.2 * meshes["data=8"]["arguments"]
    assert "fsdp=2,tensor=4 / data=8" in out
    # every mesh planned under XLA's default CPU order and its memory-optimized one
    assert set(result["schedules"]) == {"default", "memory-optimized"}
    for by_length in result["schedules"].values():
        assert all(set(rows) == set(meshes) for rows in by_length.values())
    assert set(result["remat"]) == {"none", "full", "dots", "dots_no_batch"}
    assert result["full_over_none_kept"] < 0.5


@pytest.mark.slow
def test_quantize_quick(tmp_path):
    out = run("benchmarks/quantize.py", "--quick", "--out", tmp_path / "q.json")
    assert "int8 onnx: batch-1 latency / float onnx" in out
    summary = json.loads((tmp_path / "q.json").read_text())["summary"]
    assert set(summary["digits"]) == {"none", "bf16", "int8-weights", "int8"}
    assert summary["char"]["int8-weights"]["onnx"]["bits_over_float"] > 0
    assert "char int8-weights: bits per byte / float" in out
    assert summary["digits"]["int8"]["onnx"]["latency_us"] > 0


@pytest.mark.skipif(
    shutil.which("chromium") is None or not (REPO / "export/js/node_modules").is_dir(),
    reason='needs chromium and export/js/node_modules (bash scripts/setup.sh "[dev]")',
)
def test_js_runtimes_quick(tmp_path):
    out = run("benchmarks/js_runtimes.py", "--quick", "--out", tmp_path / "j.json")
    assert "cold start ms" in out
    summary = json.loads((tmp_path / "j.json").read_text())["summary"]
    assert set(summary) == {"python", "node", "browser"}
    assert all(s["batch1Us"] > 0 and s["coldMs"] > 0 for s in summary.values())
