"""Serving throughput with dynamic batching against without, and serving memory against jax.

Run (about 2 minutes on 2 CPU cores; ``--quick`` is a few-second smoke run)::

    python benchmarks/serving.py            # full
    python benchmarks/serving.py --quick    # what the test suite runs

Setup: the digits MLP (64 -> 64 -> 10, trained for 200 steps, exported with the
default declared batch sizes 1, 8, 32) served by two ``jaxmint-serve`` processes
on 127.0.0.1: one with the default dynamic batching, one with ``--no-batching``.
64 client threads, each with its own keep-alive ``http.client`` connection,
send batch-1 infer requests back to back for a fixed time. The clients are split
over ``--client-processes`` processes so that the client side is not held to one
core by the GIL. Payloads: JSON tensors, and Triton's binary tensor extension
(binary in and out).

Targets:

* (a) throughput (requests/s) with dynamic batching / without: **>= 3** for each
  payload; p50 and p99 latency reported beside it.
* (b) peak RSS of the batching server process (after the load) / peak RSS of a
  process that only imports jax: **<= 1.3**. A process that imports jax and runs
  one jitted op is reported as well, for context.

Diagnostics: the server's CPU time per request (from ``/proc/PID/stat``, Linux)
and the mean merged batch size (from the server's ``/metrics``), which say where
the time goes when the clients, not the server, are the bottleneck.

Every number is measured side by side in this run: the four variants (payload x
server) take turns round by round, the order alternating, and the medians over
rounds are reported, because the machine is shared and noisy. Results are printed
as a table and written to ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = 64
TARGET_RATIO = 3.0
TARGET_RSS_RATIO = 1.3
INFER = "/v2/models/digits/infer"

_BUILD = r"""
import sys, optax, jaxmint
from jaxmint.export import export_model
train, test = jaxmint.data.digits()
model = jaxmint.models.mlp((64,), 10)
r = jaxmint.fit(model, jaxmint.losses.softmax_cross_entropy(), optax.adam(1e-2), train,
                steps=int(sys.argv[2]), batch_size=64, progress=False)
export_model(model, {"params": r.params}, test["x"][:16], sys.argv[1], name="digits", force=True)
"""

# Peak RSS of a bare jax process. VmHWM, not ru_maxrss: on Linux ru_maxrss carries the
# parent's peak over fork and exec (the server reports VmHWM the same way).
_RSS = r"""
import resource, sys
import jax
if sys.argv[1] == "op":
    (jax.numpy.zeros(8) + 1).block_until_ready()
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(int(hwm.split()[1]) * 1024)
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(peak if sys.platform == "darwin" else peak * 1024)
"""


# -- payloads and clients ------------------------------------------------------------------
def payload(kind: str, x: np.ndarray) -> tuple[bytes, dict]:
    """A batch-1 infer request body and its headers."""
    if kind == "json":
        tensor = {
            "name": "x",
            "shape": list(x.shape),
            "datatype": "FP32",
            "data": x.ravel().tolist(),
        }
        return json.dumps({"inputs": [tensor]}).encode(), {"Content-Type": "application/json"}
    raw = x.astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return head + raw, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def client_process(port: int, kind: str, threads: int, seconds: float, ready, out):
    """Open ``threads`` keep-alive connections, wait for every process, then send for
    ``seconds``; put the latencies on ``out``."""
    x = np.random.default_rng(os.getpid()).normal(size=(1, 64)).astype(np.float32)
    body, headers = payload(kind, x)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(threads)]
    for conn in conns:
        conn.connect()
    go, window = threading.Event(), {}

    def client(i):
        conn, mine = conns[i], latencies[i]
        go.wait()
        while time.perf_counter() < window["stop"]:
            t = time.perf_counter()
            conn.request("POST", INFER, body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors[i] += 1
            mine.append(time.perf_counter() - t)
        conn.close()

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    ready.wait(timeout=120)  # every process has its connections open
    window["stop"] = time.perf_counter() + seconds
    go.set()
    for t in pool:
        t.join()
    out.put(([t for mine in latencies for t in mine], sum(errors)))


def load(ctx, port: int, kind: str, seconds: float, processes: int) -> dict:
    """All clients against one server for ``seconds``: throughput and latency."""
    out, ready = ctx.Queue(), ctx.Barrier(processes + 1)
    per = [CLIENTS // processes + (i < CLIENTS % processes) for i in range(processes)]
    procs = [
        ctx.Process(target=client_process, args=(port, kind, n, seconds, ready, out)) for n in per
    ]
    for p in procs:
        p.start()
    ready.wait(timeout=120)
    parts = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    latencies = np.concatenate([np.asarray(p[0], float) for p in parts])
    if not len(latencies):
        raise RuntimeError(f"no request finished in {seconds} s")
    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "errors": int(sum(p[1] for p in parts)),
    }


# -- servers ----------------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, artifact: Path, *flags: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxmint_runtime.serve",
                str(artifact),
                "--port",
                "0",
                "--log-level",
                "WARNING",
                *flags,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.port: int | None = None

    def wait_ready(self) -> ServerProcess:
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"jaxmint-serve did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def config(self, model: str = "digits") -> dict:
        """The model's ``/config``: its batch sizes, window and where batches run."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", f"/v2/models/{model}/config")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body

    def metrics(self) -> dict[str, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        # {sample name: value} for the served model's series and the unlabelled ones
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels.get("model", "digits") == "digits" and "le" not in sample.labels
        }

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)


def measure(ctx, server: ServerProcess, kind: str, seconds: float, processes: int) -> dict:
    before, cpu = server.metrics(), server.cpu_seconds()
    result = load(ctx, server.port, kind, seconds, processes)
    after, cpu = server.metrics(), server.cpu_seconds() - cpu
    key = "jaxmint_batch_size_{}"
    batches = after[key.format("count")] - before.get(key.format("count"), 0)
    examples = after[key.format("sum")] - before.get(key.format("sum"), 0)
    served = result["requests_per_s"] * seconds
    result["mean_batch_size"] = examples / batches if batches else float("nan")
    result["server_cpu_us_per_request"] = cpu / served * 1e6 if served else float("nan")
    return result


def baseline_rss(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _RSS, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    return int(out.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="serve this digits artifact instead of training one",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (1 with --quick)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="per variant and round; default 4 (1 with --quick)",
    )
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ctx = multiprocessing.get_context("spawn")

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "digits"
            print("training and exporting the digits MLP ...", flush=True)
            subprocess.run([sys.executable, "-c", _BUILD, str(artifact), "200"], check=True)
        # Both start at once (loading overlaps); each is idle while the other is measured.
        servers = {
            "batching": ServerProcess(artifact),
            "no_batching": ServerProcess(artifact, "--no-batching"),
        }
        try:
            for server in servers.values():
                server.wait_ready()
            variants = [(k, s) for k in ("json", "binary") for s in ("batching", "no_batching")]
            for kind, name in variants if not args.quick else []:
                load(ctx, servers[name].port, kind, 0.3, args.client_processes)  # warm-up
            runs: dict[tuple, list[dict]] = {v: [] for v in variants}
            for r in range(rounds):
                for kind, name in variants if r % 2 == 0 else variants[::-1]:
                    result = measure(ctx, servers[name], kind, seconds, args.client_processes)
                    runs[(kind, name)].append(result)
                    print(
                        f"round {r + 1}/{rounds} {kind:6s} {name:11s} "
                        f"{result['requests_per_s']:8.0f} req/s  p99 {result['p99_ms']:6.1f} ms"
                        f"  mean batch {result['mean_batch_size']:5.1f}",
                        flush=True,
                    )
            server_rss = servers["batching"].metrics()["jaxmint_process_peak_rss_bytes"]
            unbatched_rss = servers["no_batching"].metrics()["jaxmint_process_peak_rss_bytes"]
        finally:
            exit_codes = {name: s.stop() for name, s in servers.items()}
    jax_rss, jax_op_rss = baseline_rss("import"), baseline_rss("op")

    def median(kind, name, field):
        return statistics.median(r[field] for r in runs[(kind, name)])

    throughput = {}
    for kind in ("json", "binary"):
        entry = {}
        for name in ("batching", "no_batching"):
            entry[name] = {f: median(kind, name, f) for f in runs[(kind, name)][0]}
            entry[name]["errors"] = sum(r["errors"] for r in runs[(kind, name)])
        ratios = [
            b["requests_per_s"] / u["requests_per_s"]
            for b, u in zip(runs[(kind, "batching")], runs[(kind, "no_batching")], strict=True)
        ]
        entry["ratio"] = (
            entry["batching"]["requests_per_s"] / entry["no_batching"]["requests_per_s"]
        )
        entry["ratio_paired_median"] = statistics.median(ratios)
        entry["target"] = TARGET_RATIO
        entry["meets_target"] = entry["ratio"] >= TARGET_RATIO
        throughput[kind] = entry
    memory = {
        "server_peak_rss_bytes": server_rss,
        "server_no_batching_peak_rss_bytes": unbatched_rss,
        "import_jax_peak_rss_bytes": jax_rss,
        "jax_one_op_peak_rss_bytes": jax_op_rss,
        "ratio_vs_import_jax": server_rss / jax_rss,
        "ratio_vs_jax_one_op": server_rss / jax_op_rss,
        "target": TARGET_RSS_RATIO,
        "meets_target": server_rss / jax_rss <= TARGET_RSS_RATIO,
    }

    import jax  # only for the environment record, after every measurement

    result = {
        "benchmark": "serving",
        "command": "python benchmarks/serving.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
        "config": {
            "model": "digits mlp(64) -> 10, declared batch sizes 1, 8, 32",
            "clients": CLIENTS,
            "client": "http.client keep-alive, one connection per thread",
            "client_processes": args.client_processes,
            "request_batch_size": 1,
            "server_flags": {
                "batching": "defaults (max batch 32, max delay 2 ms)",
                "no_batching": "--no-batching",
            },
            "rounds": rounds,
            "seconds_per_variant": seconds,
        },
        "throughput": throughput,
        "memory": memory,
        "server_exit_codes": exit_codes,
    }

    print()
    print(
        f"{'payload':8s} {'server':12s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'batch':>6s} {'cpu us/req':>11s} {'errors':>6s}"
    )
    for kind, entry in throughput.items():
        for name in ("batching", "no_batching"):
            e = entry[name]
            print(
                f"{kind:8s} {name:12s} {e['requests_per_s']:9.0f} {e['p50_ms']:8.2f} "
                f"{e['p99_ms']:8.2f} {e['mean_batch_size']:6.1f} "
                f"{e['server_cpu_us_per_request']:11.0f} {e['errors']:6d}"
            )
        print(
            f"{kind:8s} batching / no batching: {entry['ratio']:.2f}x (paired median "
            f"{entry['ratio_paired_median']:.2f}x; target >= {TARGET_RATIO:g}x: "
            f"{'met' if entry['meets_target'] else 'NOT met'})"
        )
    mib = 2**20
    print(
        f"peak RSS: server {server_rss / mib:.0f} MiB, import jax {jax_rss / mib:.0f} MiB "
        f"-> {memory['ratio_vs_import_jax']:.2f}x (target <= {TARGET_RSS_RATIO:g}x: "
        f"{'met' if memory['meets_target'] else 'NOT met'}); jax + one op "
        f"{jax_op_rss / mib:.0f} MiB -> {memory['ratio_vs_jax_one_op']:.2f}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
