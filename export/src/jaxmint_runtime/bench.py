"""``jaxmint-bench``: latency, throughput, cold start and peak memory of an artifact.

    jaxmint-bench ARTIFACT_DIR [--backend NAME | --all-backends] [--batch-sizes 1,8,64]
                  [--seconds S] [--json FILE]

For each batch size: `Predictor.run` is called back to back for ``--seconds`` (after
one untimed call, which compiles an undeclared size once) and the per-call wall
time gives p50/p90/p99 latency and throughput in examples per second. Cold start
runs a fresh Python process that imports the runtime, loads the artifact and
predicts once; it is timed from just before the process is spawned to the moment
it reports its first prediction, and that process reports its own peak RSS
(see `peak_rss_bytes`). With ``--all-backends`` every target of the artifact whose
backend is installed is measured the same way, one after the other, and one table
compares them, with the install size of each backend's dependencies (numpy
included) from the installed distributions' file lists.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as metadata
import json
import os
import re
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
predictor = jaxmint_runtime.load(sys.argv[1], backend=sys.argv[2])
t2 = time.perf_counter()
predictor.run(example_inputs(predictor, 1))
t3 = time.perf_counter()
print(json.dumps({"predicted_at": time.time(), "import_s": t1 - t0, "load_s": t2 - t1,
                  "first_prediction_s": t3 - t2, "peak_rss_bytes": peak_rss_bytes(),
                  "backend": predictor.backend_name}), flush=True)
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
    from jaxmint_runtime._format import np_dtype

    rng = np.random.default_rng(seed)
    out = {}
    for spec in predictor.inputs:
        shape = tuple(batch if isinstance(d, str) else d for d in spec.shape)
        dtype = np_dtype(spec.dtype)
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


def cold_start(artifact: str | os.PathLike, backend: str = "auto") -> dict:
    """Spawn a fresh interpreter that loads ``artifact`` and predicts once; time it."""
    t0 = time.time()  # wall clock: the child stamps its first prediction with the same clock
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(artifact), backend],
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


def run(artifact, batch_sizes=None, seconds: float = 2.0, cold: bool = True, backend="auto"):
    """Everything ``jaxmint-bench`` reports for one backend, as a dict."""
    from jaxmint_runtime import load

    predictor = load(artifact, backend=backend)
    sizes = list(batch_sizes or predictor.batch_sizes or [1, 8, 64])
    report = {
        "artifact": str(artifact),
        "model": predictor.name,
        "backend": predictor.backend_name,
        "declared_batch_sizes": predictor.batch_sizes,
        "seconds_per_size": seconds,
        "latency": [latency(predictor, b, seconds) for b in sizes],
        "install_bytes": install_size(predictor.backend_name),
    }
    if cold:
        report["cold_start"] = cold_start(artifact, predictor.backend_name)
    return report


def run_all(artifact, batch_sizes=None, seconds: float = 2.0, cold: bool = True) -> dict:
    """`run` for each target of the artifact whose backend is installed here."""
    from jaxmint_runtime import backends
    from jaxmint_runtime._format import ArtifactError, read_manifest

    targets = list(read_manifest(artifact)["targets"])
    usable = [t for t in targets if backends.installed(t)]
    if not usable:
        hints = "; ".join(backends.install_hint(t) for t in targets)
        raise RuntimeError(f"no backend for the artifact's targets {targets} is installed: {hints}")
    reports, failed = [], {}
    for b in usable:
        try:
            reports.append(run(artifact, batch_sizes, seconds, cold, backend=b))
        except (ArtifactError, RuntimeError) as e:  # one backend failing keeps the others
            failed[b] = str(e)
    if not reports:
        raise RuntimeError(f"no backend could run the artifact: {failed}")
    return {
        "artifact": str(artifact),
        "not_installed": [t for t in targets if t not in usable],
        "failed": failed,
        "backends": reports,
    }


# What each backend installs besides the core's numpy.
_BACKEND_DISTS = {
    "xla": ("jax", "jaxlib", "flatbuffers"),
    "onnx": ("onnxruntime",),
    "iree": ("iree-base-runtime",),
}


def install_size(backend: str) -> int | None:
    """Bytes on disk of a backend's distributions and their dependencies, numpy included
    (None when one of its own distributions is not installed)."""
    seen, total = set(), 0
    stack = [*_BACKEND_DISTS[backend], "numpy"]
    roots = set(_BACKEND_DISTS[backend])
    while stack:
        name = re.sub(r"[-_.]+", "-", stack.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in roots:
                return None
            continue  # an optional dependency that is not installed
        for f in dist.files or []:
            with contextlib.suppress(OSError):  # listed in RECORD, since removed
                total += dist.locate_file(f).stat().st_size
        for req in dist.requires or []:
            if "extra ==" in req.replace('"', "").replace("'", ""):
                continue
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if match:
                stack.append(match.group(1))
    return total


def table(report: dict) -> str:
    lines = [
        f"{report['model']} on {report['backend']}  ({report['artifact']}; declared batch sizes "
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


def table_all(report: dict) -> str:
    """One row per backend and batch size: the comparison ``--all-backends`` prints."""
    head = (
        f"{'backend':<8} {'batch':>6} {'p50 ms':>9} {'p99 ms':>9} {'examples/s':>12} "
        f"{'cold start s':>13} {'peak RSS MiB':>13} {'install MiB':>12}"
    )
    lines = [f"{report['backends'][0]['model']}  ({report['artifact']})", head]
    for r in report["backends"]:
        cold = r.get("cold_start") or {}
        start = cold.get("process_start_to_first_prediction_s")
        rss = cold.get("peak_rss_bytes")
        size = r["install_bytes"]
        for lat in r["latency"]:
            lines.append(
                f"{r['backend']:<8} {lat['batch_size']:>6} {lat['p50_ms']:>9.3f} "
                f"{lat['p99_ms']:>9.3f} {lat['examples_per_s']:>12.0f} "
                f"{_fmt(start, 1, '{:.2f}'):>13} {_fmt(rss, 2**20, '{:.0f}'):>13} "
                f"{_fmt(size, 2**20, '{:.0f}'):>12}"
            )
    if report["not_installed"]:
        lines.append(f"not installed here: {report['not_installed']}")
    for backend, why in report.get("failed", {}).items():
        lines.append(f"{backend}: failed: {why}")
    return "\n".join(lines)


def _fmt(value, scale, spec: str) -> str:
    return "-" if value is None else spec.format(value / scale)


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
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--backend", default="auto", help="xla, onnx, iree or auto (default %(default)s)"
    )
    which.add_argument(
        "--all-backends",
        action="store_true",
        help="measure every target whose backend is installed; print one comparison table",
    )
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
        if args.all_backends:
            report = run_all(args.artifact, sizes, args.seconds, args.cold)
        else:
            report = run(args.artifact, sizes, args.seconds, args.cold, backend=args.backend)
    except (ArtifactError, OSError, RuntimeError) as e:
        print(f"jaxmint-bench: {e}", file=sys.stderr)
        return 2
    print(table_all(report) if args.all_backends else table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
