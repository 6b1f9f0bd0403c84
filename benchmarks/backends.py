"""Backends side by side: XLA, ONNX Runtime and IREE running the same exported model.

    python benchmarks/backends.py [--quick] [--out FILE]

Setup: the digits MLP experiment (default widths 256-256, trained briefly) and a
small char transformer, each exported once with ``--target xla,onnx,iree``
(declared batch sizes 1, 8, 64).

Targets (digits MLP, CPU):

* (a) batch-1 latency of the fastest backend / XLA's: **<= 0.5**. One process
  holds a predictor per backend; each round times ``predictor(x)`` back to back
  for every backend in turn, the order alternating; the medians over rounds are
  compared.
* (b) peak RSS of the leanest backend's ``jaxmint-serve`` process / the XLA
  backend's: **<= 0.35**. Each server is a fresh process (``--backend NAME``)
  that answers the same infer requests; its VmHWM is read from ``/proc`` after.

Reported as well: IREE's batch-1 latency with its default ``local-sync`` driver
against ``local-task`` (a thread pool), interleaved with the others; and, per
model, ``jaxmint-bench --all-backends`` (p50/p99 latency,
throughput, cold start, peak RSS and install size per backend), the table that
docs/deployment.md shows. Results go to ``benchmarks/results/backends.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import environment, table, write_result
from serving import ServerProcess, payload

REPO = Path(__file__).resolve().parents[1]
TARGET_LATENCY = 0.5
TARGET_RSS = 0.35
TARGETS = ("xla", "onnx", "iree")


def export_experiment(
    name: str, tmp: Path, steps: int, batch_sizes=(1, 8, 64), **overrides
) -> Path:
    from jaxmint.experiment import fit_experiment, load_module
    from jaxmint.export import export_run

    script = REPO / f"experiments/{name}.py"
    module = load_module(script)
    config = dataclasses.replace(
        module.Config(),
        workdir=str(tmp / f"run-{name}"),
        progress=False,
        steps=steps,
        eval_every=10**6,
        checkpoint_every=10**6,
        **overrides,
    )
    fit_experiment(module.build(config), config, script=script)
    return export_run(
        tmp / f"run-{name}",
        tmp / f"artifact-{name}",
        targets=TARGETS,
        batch_sizes=batch_sizes,
        iree_hal_targets=["llvm-cpu"],
    )


def batch1_latency(artifact: Path, variants: dict[str, dict], rounds: int, calls: int) -> dict:
    """Median µs per batch-1 call for each ``{label: load() keyword arguments}``."""
    import jaxmint_runtime

    predictors = {name: jaxmint_runtime.load(artifact, **kw) for name, kw in variants.items()}
    backends = list(predictors)
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    for p in predictors.values():
        for _ in range(200):
            p(x)
    times: dict[str, list[float]] = {b: [] for b in backends}
    for r in range(rounds):
        for b in backends if r % 2 == 0 else backends[::-1]:
            p = predictors[b]
            t = time.perf_counter()
            for _ in range(calls):
                p(x)
            times[b].append((time.perf_counter() - t) / calls)
    return {b: statistics.median(v) * 1e6 for b, v in times.items()}


def serving_rss(artifact: Path, backend: str, requests: int) -> dict:
    server = ServerProcess(artifact, "--backend", backend).wait_ready()
    try:
        x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
        body, headers = payload("json", x)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for _ in range(requests):
            conn.request("POST", "/v2/models/digits_mlp/infer", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{backend} server answered {response.status}")
        conn.close()
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        hwm_kib = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM"))
    finally:
        server.stop()
    return {"peak_rss_bytes": hwm_kib * 1024, "requests": requests}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run for the tests")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/backends.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    from jaxmint_runtime import backends, bench

    tmp = Path(tempfile.mkdtemp(prefix="jaxmint-backends-"))
    os.environ.setdefault("JAXMINT_CACHE_DIR", str(tmp / "xla-cache"))
    mlp = export_experiment("digits_mlp", tmp, 50 if args.quick else 500)
    # --quick: a smaller transformer at the two batch sizes its table times
    transformer = export_experiment(
        "char_transformer",
        tmp,
        5 if args.quick else 100,
        (1, 8) if args.quick else (1, 8, 64),
        seq_len=32 if args.quick else 64,
        d_model=32 if args.quick else 64,
        num_layers=2,
        num_heads=4,
        batch_size=16,
        corpus_bytes=200_000,
    )
    written = list(json.loads((mlp / "manifest.json").read_text())["targets"])
    usable = [b for b in written if backends.installed(b)]

    variants = {b: {"backend": b} for b in usable}
    if "iree" in usable:  # the default driver against IREE's thread pool
        variants["iree/local-task"] = {"backend": "iree", "iree_driver": "local-task"}
    lat = batch1_latency(
        mlp, variants, rounds=3 if args.quick else 11, calls=200 if args.quick else 3000
    )
    local_task = lat.pop("iree/local-task", None)
    best = min((b for b in usable if b != "xla"), key=lat.get)
    rss = {b: serving_rss(mlp, b, 20 if args.quick else 500) for b in usable}
    leanest = min((b for b in usable if b != "xla"), key=lambda b: rss[b]["peak_rss_bytes"])
    seconds = 0.2 if args.quick else 2.0
    tables = {
        "digits_mlp": bench.run_all(mlp, [1, 8, 64], seconds),
        # --quick times cold starts on the MLP only: one subprocess per backend less
        "char_transformer": bench.run_all(transformer, [1, 8], seconds, cold=not args.quick),
    }
    result = {
        "environment": environment(),
        "batch1_latency_us": lat,
        "iree_driver_batch1_us": {"local-sync": lat.get("iree"), "local-task": local_task},
        "latency_ratio_best_over_xla": lat[best] / lat["xla"],
        "best_backend": best,
        "target_latency_ratio": TARGET_LATENCY,
        "serving_peak_rss": rss,
        "rss_ratio_leanest_over_xla": rss[leanest]["peak_rss_bytes"] / rss["xla"]["peak_rss_bytes"],
        "leanest_backend": leanest,
        "target_rss_ratio": TARGET_RSS,
        "all_backends": tables,
        "transformer_targets": {
            "written": list(json.loads((transformer / "manifest.json").read_text())["targets"]),
            "skipped": json.loads((transformer / "manifest.json").read_text())["skipped_targets"],
        },
    }
    rows = [
        (
            b,
            f"{lat[b]:.1f}",
            f"{lat[b] / lat['xla']:.2f}",
            f"{rss[b]['peak_rss_bytes'] / 2**20:.0f}",
            f"{rss[b]['peak_rss_bytes'] / rss['xla']['peak_rss_bytes']:.2f}",
        )
        for b in usable
    ]
    header = ("backend", "batch-1 us", "vs xla", "serve RSS MiB", "vs xla")
    print(table("digits MLP, one process per measurement kind", header, rows))
    print(
        f"\n(a) batch-1 latency {best}/xla = {result['latency_ratio_best_over_xla']:.2f} "
        f"(target <= {TARGET_LATENCY})"
    )
    print(
        f"(b) serving peak RSS {leanest}/xla = {result['rss_ratio_leanest_over_xla']:.2f} "
        f"(target <= {TARGET_RSS})"
    )
    if local_task is not None:
        print(
            f"IREE drivers at batch 1: local-sync {lat['iree']:.1f} us (the default), "
            f"local-task {local_task:.1f} us"
        )
    for report in tables.values():
        print()
        print(bench.table_all(report))
    skipped = result["transformer_targets"]["skipped"]
    for target, why in skipped.items():
        print(f"char_transformer: target {target} skipped: {why}")
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
