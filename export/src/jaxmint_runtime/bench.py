"""``jaxmint-bench``: latency, throughput, cold start and peak memory of an artifact.

    jaxmint-bench ARTIFACT_DIR [--batch-sizes 1,8,64] [--seconds S] [--json FILE]

For each batch size: `Predictor.run` is called back to back for ``--seconds`` (after
one untimed call, which compiles an undeclared size once) and the per-call wall
time gives p50/p90/p99 latency and throughput in examples per second. Cold start
runs a fresh Python process that imports the runtime, loads the artifact and
predicts once; it is timed from just before the process is spawned to the moment
it reports its first prediction, and that process reports its own peak RSS
(see `peak_rss_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MAX_CALLS = 1_000_000  # per batch size, whatever --seconds says
COLD_START_TIMEOUT_S = 600

# Runs in the fresh process: times its own steps, reports one JSON line.
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import jaxmint_runtime
from jaxmint_runtime.bench import example_inputs, peak_rss_bytes
t1 = time.perf_counter()
predictor = jaxmint_runtime.load(sys.argv[1])
t2 = time.perf_counter()
predictor.run(example_inputs(predictor, 1))
t3 = time.perf_counter()
print(json.dumps({"predicted_at": time.time(), "import_s": t1 - t0, "load_s": t2 - t1,
                  "first_prediction_s": t3 - t2, "peak_rss_bytes": peak_rss_bytes()}), flush=True)
"""


def peak_rss_bytes() -> int:
    """This process's peak resident set size, in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``resource.getrusage``'s
    ``ru_maxrss`` carries over the parent's peak across fork and exec there, so a
    small process started by a big one would report the big one's peak.
    Elsewhere it is ``ru_maxrss`` (bytes on macOS, KiB on other systems).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def example_inputs(predictor, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of ``batch`` examples matching the predictor's signature."""
    from jaxmint_runtime._predictor import _np_dtype

    rng = np.random.default_rng(seed)
    out = {}
    for spec in predictor.inputs:
        shape = tuple(batch if isinstance(d, str) else d for d in spec.shape)
        dtype = _np_dtype(spec.dtype)
        if dtype.kind in "fV":
            out[spec.name] = rng.normal(size=shape).astype(dtype)
        else:
            out[spec.name] = np.zeros(shape, dtype)
    return out


def latency(predictor, batch: int, seconds: float) -> dict:
    """Time back-to-back `Predictor.run` calls of ``batch`` examples for ``seconds``."""
    inputs = example_inputs(predictor, batch)
    t = time.perf_counter()
    predictor.run(inputs)  # an undeclared size compiles here, once
    first = time.perf_counter() - t
    times = []
    start = time.perf_counter()
    while len(times) < MAX_CALLS and (not times or time.perf_counter() - start < seconds):
        t = time.perf_counter()
        predictor.run(inputs)
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    p50, p90, p99 = np.percentile(times, [50, 90, 99]) * 1e3
    return {
        "batch_size": batch,
        "calls": len(times),
        "first_call_ms": first * 1e3,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "examples_per_s": batch * len(times) / elapsed,
    }


def cold_start(artifact: str | os.PathLike) -> dict:
    """Spawn a fresh interpreter that loads ``artifact`` and predicts once; time it."""
    t0 = time.time()  # wall clock: the child stamps its first prediction with the same clock
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(artifact)],
            capture_output=True,
            text=True,
            timeout=COLD_START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"the cold-start process did not finish in {COLD_START_TIMEOUT_S} s"
        ) from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the cold-start process failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    child = json.loads(lines[-1])
    total = child.pop("predicted_at") - t0
    return {"process_start_to_first_prediction_s": total, **child}


def run(artifact, batch_sizes=None, seconds: float = 2.0, cold: bool = True) -> dict:
    """Everything ``jaxmint-bench`` reports, as a dict."""
    from jaxmint_runtime import load

    predictor = load(artifact)
    sizes = list(batch_sizes or predictor.batch_sizes or [1, 8, 64])
    report = {
        "artifact": str(artifact),
        "model": predictor.name,
        "declared_batch_sizes": predictor.batch_sizes,
        "seconds_per_size": seconds,
        "latency": [latency(predictor, b, seconds) for b in sizes],
    }
    if cold:
        report["cold_start"] = cold_start(artifact)
    return report


def table(report: dict) -> str:
    lines = [
        f"{report['model']}  ({report['artifact']}; declared batch sizes "
        f"{report['declared_batch_sizes']})",
        f"{'batch':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'examples/s':>12} "
        f"{'calls':>8} {'first ms':>9}",
    ]
    for r in report["latency"]:
        lines.append(
            f"{r['batch_size']:>6} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} "
            f"{r['examples_per_s']:>12.0f} {r['calls']:>8} {r['first_call_ms']:>9.1f}"
        )
    cold = report.get("cold_start")
    if cold:
        lines.append(
            f"cold start: {cold['process_start_to_first_prediction_s']:.2f} s from process start "
            f"to first prediction (import {cold['import_s']:.2f} s, "
            f"load + warm-up {cold['load_s']:.2f} s, "
            f"first prediction {cold['first_prediction_s'] * 1e3:.1f} ms); "
            f"peak RSS {cold['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jaxmint-bench", description=__doc__.splitlines()[0])
    p.add_argument("artifact", metavar="ARTIFACT_DIR")
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated, e.g. 1,8,64 (default: the artifact's declared sizes)",
    )
    p.add_argument("--seconds", type=float, default=2.0, help="per batch size (default 2)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write JSON here")
    p.add_argument("--no-cold-start", dest="cold", action="store_false", help="skip cold start")
    args = p.parse_args(argv)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    except ValueError:
        p.error(f"--batch-sizes takes integers like 1,8,64, got {args.batch_sizes!r}")
    if sizes is not None and any(b < 1 for b in sizes):
        p.error(f"batch sizes must be positive, got {sizes}")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    from jaxmint_runtime._format import ArtifactError

    try:
        report = run(args.artifact, sizes, args.seconds, args.cold)
    except (ArtifactError, OSError, RuntimeError) as e:
        print(f"jaxmint-bench: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
