"""Where batches run: no batching, the worker thread, the event loop (``--batch-on``).

Run (about a minute on 2 CPU cores; needs ``wrk``, ``apt-get install -y wrk``)::

    python benchmarks/batching.py            # 3 rounds of 4 s per backend
    python benchmarks/batching.py --quick    # 1 round of 1 s, onnx only

Setup: the digits MLP, served three ways side by side per backend (``onnx``,
``xla``): ``--no-batching``, batching on the model's worker thread (``--batch-on
thread``), and the default (``--batch-on auto``, which times a batch at load and
picks the event loop for this model; the table says where each ran its batches).
Load: ``wrk`` in its own process, batch-1 JSON requests back to back from 64
connections, the servers in interleaved order each round; then 1 connection.
Reported per variant: requests/s (median of rounds), server CPU per request
(user + system from /proc), and p50 at 1 connection; the ratios are each
batching variant over ``--no-batching`` at 64 connections (issue target: >= 2
per backend). Written to ``benchmarks/results/batching.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import environment, med, table, write_result
from grpc_rest import rest_load, wrk_files
from serving import ServerProcess, payload
from serving_peers import _BUILD, cpu_seconds  # the digits MLP with its onnx target

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "no batching": ["--no-batching"],
    "worker thread": ["--batch-on", "thread"],
    "default": [],  # --batch-on auto: it times a batch and picks (the loop, for this model)
}


def measure(artifact: Path, backend: str, files: dict, rounds: int, seconds: float) -> dict:
    servers = {
        name: ServerProcess(artifact, "--backend", backend, "--no-grpc", *flags)
        for name, flags in VARIANTS.items()
    }
    rows = {name: {"requests_per_s": [], "cpu_us_per_request": []} for name in servers}
    try:
        ports = {name: s.wait_ready().port for name, s in servers.items()}
        for name, server in servers.items():  # where each server runs its batches
            rows[name]["batch_on"] = server.config()["batch_on"]
        for port in ports.values():
            rest_load(port, 8, 1, files)  # warm-up: buckets, caches
        for r in range(rounds):
            for name in list(ports) if r % 2 == 0 else list(ports)[::-1]:
                pid = servers[name].proc.pid
                before = cpu_seconds(pid)
                got = rest_load(ports[name], 64, seconds, files)
                cpu = 1e6 * (cpu_seconds(pid) - before) / got["requests"]
                rows[name]["requests_per_s"].append(got["requests_per_s"])
                rows[name]["cpu_us_per_request"].append(cpu)
        for name, port in ports.items():
            rows[name]["p50_ms_1_connection"] = rest_load(port, 1, seconds, files)["p50_ms"]
    finally:
        for s in servers.values():
            s.stop()
    summary = {
        name: {
            "requests_per_s": med(row["requests_per_s"]),
            "cpu_us_per_request": med(row["cpu_us_per_request"]),
            "p50_ms_1_connection": row["p50_ms_1_connection"],
            "batch_on": row["batch_on"],
        }
        for name, row in rows.items()
    }
    base = summary["no batching"]["requests_per_s"]
    for row in summary.values():
        row["over_no_batching"] = row["requests_per_s"] / base
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: onnx, 1 round of 1 s")
    parser.add_argument("--out", type=Path, default=RESULTS / "batching.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("batching: needs wrk (apt-get install -y wrk)")
    rounds, seconds = (1, 1.0) if args.quick else (3, 4.0)
    backends = ("onnx",) if args.quick else ("onnx", "xla")
    load_before = os.getloadavg()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifact = tmp / "digits"
        print("training and exporting the digits MLP ...", flush=True)
        subprocess.run([sys.executable, "-c", _BUILD, str(artifact)], check=True)
        x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
        files = wrk_files(tmp, *payload("json", x))
        summary = {b: measure(artifact, b, files, rounds, seconds) for b in backends}

    for backend, rows in summary.items():
        header = ("variant", "batches on", "req/s at 64", "vs no batching", "CPU us/req")
        header += ("p50 ms at 1",)
        cells = [
            (
                name,
                r["batch_on"],
                f"{r['requests_per_s']:.0f}",
                f"{r['over_no_batching']:.2f}",
                f"{r['cpu_us_per_request']:.0f}",
                f"{r['p50_ms_1_connection']:.3f}",
            )
            for name, r in rows.items()
        ]
        print(table(f"{backend}: the digits MLP, wrk, JSON batch-1 requests", header, cells))
    result = {"environment": environment(), "quick": args.quick, "summary": summary}
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
