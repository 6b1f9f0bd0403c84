"""jaxmint-serve today against the same server at an earlier revision, side by side under wrk.

Run (about 4 minutes on 2 CPU cores; ``--quick`` is a few-second smoke run)::

    python benchmarks/serving_transport.py                   # against BASELINE
    python benchmarks/serving_transport.py --baseline REV    # any revision of this repository

Why: the server's HTTP layer was rewritten (a maintained parser, limits checked
before any work, batch-size buckets). This says what that cost. The baseline
is the runtime package of ``--baseline`` (default: the last revision whose
server parsed HTTP by hand), taken from git into a temporary folder and put
first on the server's ``PYTHONPATH``; a third server runs today's code again as an
A/A control, whose ratio to today's is the noise of the run. All load the same
artifact with their default flags.

Load: ``wrk`` (Debian package ``wrk``), a separate process, 64 keep-alive
connections over 2 threads, batch-1 infer requests, JSON and Triton binary
payloads. The servers take turns round by round, the order alternating;
medians over rounds are reported. Targets: today's requests/s at least
**0.9** of the baseline's, and p99 latency **no worse** (ratio <= 1.0), for
each payload. Each server's worst p99 over the rounds and its longest request are
reported beside the medians: a rare stall (such as a full garbage collection of
the whole heap) shows there, not in a median. Writes
``benchmarks/results/serving_transport.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
from _common import environment, med, table, write_result
from serving import _BUILD, INFER, ServerProcess, payload

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RUNTIME = "export/src/jaxmint_runtime"
# The parent of "jaxmint-serve parses HTTP with h11": the hand-written parser's last revision.
BASELINE = "f2bff83"
CONNECTIONS, THREADS = 64, 2
TARGET_RPS, TARGET_P99 = 0.9, 1.0

# wrk sends one body on every connection and prints its summary as one JSON line.
_WRK_SCRIPT = """
local f = assert(io.open(os.getenv("JAXMINT_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
for name, value in string.gmatch(os.getenv("JAXMINT_BENCH_HEADERS"), "([^\\n:]+):([^\\n]*)") do
  wrk.headers[name] = value
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"socket_errors": %d, "non_2xx": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def baseline_runtime(revision: str, into: Path) -> Path:
    """The runtime package at ``revision``, written under ``into``; the folder to import it from."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, RUNTIME],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        sys.exit(
            f"serving_transport: git cannot give {RUNTIME} at {revision!r}: "
            f"{archive.stderr.decode().strip()}"
        )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "export" / "src"


def imported_from(env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import jaxmint_runtime; print(jaxmint_runtime.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return out.stdout.strip()


def wrk(port: int, seconds: float, files: dict[str, Path], kind: str) -> dict:
    env = {
        **os.environ,
        "JAXMINT_BENCH_BODY": str(files[kind]),
        "JAXMINT_BENCH_HEADERS": files[kind + "_headers"].read_text(),
    }
    out = subprocess.run(
        [
            "wrk",
            f"-t{THREADS}",
            f"-c{CONNECTIONS}",
            f"-d{seconds:g}s",
            "--timeout",
            "10s",
            "-s",
            str(files["script"]),
            f"http://127.0.0.1:{port}{INFER}",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=seconds + 60,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    if not summary["requests"]:
        raise RuntimeError(f"no request finished in {seconds} s:\n{out.stdout}")
    return {
        "requests_per_s": summary["requests"] / (summary["duration_us"] / 1e6),
        "p50_ms": summary["p50_us"] / 1e3,
        "p99_ms": summary["p99_us"] / 1e3,
        "max_ms": summary["max_us"] / 1e3,
        "errors": summary["socket_errors"] + summary["non_2xx"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--baseline", default=BASELINE, help=f"git revision (default {BASELINE})")
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="serve this digits artifact instead of training one",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 7 (1 with --quick)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="per server, payload and round; default 5 (1 with --quick)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_transport.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("serving_transport: needs wrk (apt-get install -y wrk)")
    rounds = args.rounds or (1 if args.quick else 7)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    load_before = os.getloadavg()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_env = {**os.environ, "PYTHONPATH": str(baseline_runtime(args.baseline, tmp / "old"))}
        where = imported_from(old_env)
        if not where.startswith(str(tmp)):
            sys.exit(f"serving_transport: the baseline imported jaxmint_runtime from {where}")
        artifact = args.artifact
        if artifact is None:
            artifact = tmp / "digits"
            print("training and exporting the digits MLP ...", flush=True)
            subprocess.run([sys.executable, "-c", _BUILD, str(artifact), "200"], check=True)
        x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
        files = {"script": tmp / "infer.lua"}
        files["script"].write_text(_WRK_SCRIPT)
        for kind in ("json", "binary"):
            body, headers = payload(kind, x)
            files[kind] = tmp / f"{kind}.body"
            files[kind].write_bytes(body)
            files[kind + "_headers"] = tmp / f"{kind}.headers"
            files[kind + "_headers"].write_text("".join(f"{k}:{v}\n" for k, v in headers.items()))
        # "today again" is an A/A control: two identical servers, so its ratio to "today"
        # is the noise floor of this machine and run.
        servers = {
            "today": ServerProcess(artifact),
            "baseline": ServerProcess(artifact, env=old_env),
            "today again": ServerProcess(artifact),
        }
        try:
            for server in servers.values():
                server.wait_ready()
            variants = [(k, s) for k in ("json", "binary") for s in servers]
            for kind, name in variants:
                wrk(servers[name].port, 1, files, kind)  # warm-up: connections, buckets, caches
            runs: dict[tuple, list[dict]] = {v: [] for v in variants}
            for r in range(rounds):
                for kind, name in variants if r % 2 == 0 else variants[::-1]:
                    result = wrk(servers[name].port, seconds, files, kind)
                    runs[(kind, name)].append(result)
                    print(
                        f"round {r + 1}/{rounds} {kind:6s} {name:11s} "
                        f"{result['requests_per_s']:7.0f} req/s  p99 {result['p99_ms']:6.1f} ms  "
                        f"max {result['max_ms']:6.1f} ms",
                        flush=True,
                    )
        finally:
            exit_codes = {name: s.stop() for name, s in servers.items()}

    summary, rows = {}, []
    for kind in ("json", "binary"):
        entry = {
            name: {f: med(r[f] for r in runs[(kind, name)]) for f in runs[(kind, name)][0]}
            for name in servers
        }
        for name in servers:
            done = runs[(kind, name)]
            entry[name]["errors"] = sum(r["errors"] for r in done)
            # The tail of the tail: one stall (a full garbage collection, say) shows in
            # one round's p99 and max, which the medians hide.
            entry[name]["worst_p99_ms"] = max(r["p99_ms"] for r in done)
            entry[name]["max_ms"] = max(r["max_ms"] for r in done)
        today, old, again = entry["today"], entry["baseline"], entry["today again"]
        entry["rps_ratio"] = today["requests_per_s"] / old["requests_per_s"]
        entry["p99_ratio"] = today["p99_ms"] / old["p99_ms"]
        entry["control_rps_ratio"] = again["requests_per_s"] / today["requests_per_s"]
        entry["control_p99_ratio"] = again["p99_ms"] / today["p99_ms"]
        entry["meets_target"] = (
            entry["rps_ratio"] >= TARGET_RPS and entry["p99_ratio"] <= TARGET_P99
        )
        summary[kind] = entry
        for name in servers:
            e = entry[name]
            rows.append(
                [
                    kind,
                    name,
                    f"{e['requests_per_s']:.0f}",
                    f"{e['p50_ms']:.2f}",
                    f"{e['p99_ms']:.2f}",
                    f"{e['worst_p99_ms']:.1f}",
                    f"{e['max_ms']:.1f}",
                    e["errors"],
                ]
            )
    print()
    print(
        table(
            f"wrk, {CONNECTIONS} connections, medians of {rounds} rounds of {seconds:g} s",
            ["payload", "server", "req/s", "p50 ms", "p99 ms", "worst p99", "max ms", "errors"],
            rows,
        )
    )
    for kind, entry in summary.items():
        print(
            f"{kind:6s} today / baseline: req/s {entry['rps_ratio']:.3f} (target >= {TARGET_RPS}),"
            f" p99 {entry['p99_ratio']:.3f} (target <= {TARGET_P99}): "
            f"{'met' if entry['meets_target'] else 'MISSED'}; A/A control (today again / today): "
            f"req/s {entry['control_rps_ratio']:.3f}, p99 {entry['control_p99_ratio']:.3f}"
        )
    result = {
        "benchmark": "serving_transport",
        "command": "python benchmarks/serving_transport.py" + (" --quick" if args.quick else ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "baseline": args.baseline,
        "config": {
            "connections": CONNECTIONS,
            "wrk_threads": THREADS,
            "rounds": rounds,
            "seconds": seconds,
            "request_batch_size": 1,
            "server_flags": "defaults",
        },
        "throughput": summary,
        "server_exit_codes": exit_codes,
        "environment": {**environment(), "load_average_at_start": load_before},
    }
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
