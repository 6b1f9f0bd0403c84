"""gRPC against REST on one jaxmint-serve process: requests/s, p50 and p99 per connection count.

Run (about 2 minutes on 2 CPU cores; ``--quick`` is a smoke run; needs ``wrk``,
``apt-get install -y wrk``)::

    python benchmarks/grpc_rest.py            # full
    python benchmarks/grpc_rest.py --quick

Setup: the digits MLP (as in ``serving.py``) served by one ``jaxmint-serve`` with
dynamic batching and both ports. Batch-1 requests with binary tensors, back to back,
from 1, 8 and 64 connections, the load generator in other processes: ``wrk`` for
REST (Triton's binary extension), and for gRPC a client of as many channels, split
over up to ``--client-processes`` processes, each channel a thread sending
pre-serialized ``ModelInferRequest`` messages (``raw_input_contents``) through
grpcio's blocking stub. The two generators differ (C against Python with grpcio's
C core), so the ratio says what a user of each client gets, not only the server.

Reported (no fixed target): gRPC / REST requests/s, and p50 and p99 of each, per
connection count; medians of the rounds, the two protocols taking turns. Written to
``benchmarks/results/grpc_rest.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import environment, med, table, write_result
from serving import _BUILD, ServerProcess, payload
from serving_transport import _WRK_SCRIPT

RESULTS = Path(__file__).resolve().parent / "results"
CONNECTIONS = (1, 8, 64)
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def wrk_files(folder: Path, body: bytes, headers: dict) -> dict:
    """The files `rest_load` gives wrk: its Lua script, the request body and headers."""
    files = {"script": folder / "infer.lua", "body": folder / "body", "headers": folder / "headers"}
    files["script"].write_text(_WRK_SCRIPT)
    files["body"].write_bytes(body)
    files["headers"].write_text("".join(f"{k}:{v}\n" for k, v in headers.items()))
    return files


def rest_load(port: int, connections: int, seconds: float, files: dict) -> dict:
    import json

    env = {
        **os.environ,
        "JAXMINT_BENCH_BODY": str(files["body"]),
        "JAXMINT_BENCH_HEADERS": files["headers"].read_text(),
    }
    threads = min(connections, 2)
    out = subprocess.run(
        [
            *("wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"),
            *("-s", str(files["script"]), f"http://127.0.0.1:{port}/v2/models/digits/infer"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=seconds + 60,
    )
    s = json.loads(out.stdout.strip().splitlines()[-1])
    if s["socket_errors"] or s["non_2xx"]:
        raise RuntimeError(f"wrk saw errors: {s}")
    return {
        "requests": s["requests"],
        "requests_per_s": s["requests"] / (s["duration_us"] / 1e6),
        "p50_ms": s["p50_us"] / 1e3,
        "p99_ms": s["p99_us"] / 1e3,
    }


def grpc_client(port: int, channels: int, seconds: float, request: bytes, ready, out) -> None:
    """One client process: ``channels`` channels, a thread each, calling back to back."""
    import grpc

    stubs = []
    for _ in range(channels):
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stubs.append(channel.unary_unary(METHOD))  # bytes in, bytes out: no client parsing
    for stub in stubs:
        stub(request, timeout=30)  # connect and warm up before the clock starts
    latencies: list[list[float]] = [[] for _ in stubs]
    ready.wait()
    stop = time.perf_counter() + seconds

    def work(stub, into):
        while (start := time.perf_counter()) < stop:
            stub(request, timeout=30)
            into.append(time.perf_counter() - start)

    threads = [
        threading.Thread(target=work, args=(s, lat))
        for s, lat in zip(stubs, latencies, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put([x for lat in latencies for x in lat])


def grpc_load(port: int, connections: int, seconds: float, request: bytes, processes: int):
    ctx = multiprocessing.get_context("spawn")
    processes = min(processes, connections)
    per = [connections // processes + (i < connections % processes) for i in range(processes)]
    ready, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=grpc_client, args=(port, n, seconds, request, ready, out)) for n in per
    ]
    for p in procs:
        p.start()
    time.sleep(2.0)  # the clients connect and warm up (spawned interpreters import grpc)
    ready.set()
    latencies = [x for _ in procs for x in out.get(timeout=seconds + 120)]
    for p in procs:
        p.join(timeout=30)
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1e3 * latencies[len(latencies) // 2],
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--artifact", type=Path, default=None, help="a digits artifact to serve")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "grpc_rest.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("grpc_rest: needs wrk (apt-get install -y wrk)")
    rounds, seconds = (1, 1.0) if args.quick else (3, 5.0)
    connections = (1, 8) if args.quick else CONNECTIONS
    load_before = os.getloadavg()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxmint_runtime.serve.grpc_proto import open_inference_pb2 as pb

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifact = args.artifact
        if artifact is None:
            artifact = tmp / "digits"
            print("training and exporting the digits MLP ...", flush=True)
            subprocess.run([sys.executable, "-c", _BUILD, str(artifact), "200"], check=True)
        x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
        body, headers = payload("binary", x)
        files = wrk_files(tmp, body, headers)
        request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
        request = request.SerializeToString()

        server = ServerProcess(artifact).wait_ready()
        line = server.proc.stdout.readline()
        if "gRPC listening on" not in line:
            raise SystemExit(f"grpc_rest: the server serves no gRPC: {line!r}")
        grpc_port = int(line.rsplit(":", 1)[1])
        results = {c: {"rest": [], "grpc": []} for c in connections}
        try:
            rest_load(server.port, 8, 1, files)  # warm-up: buckets, caches
            for r in range(rounds):
                for c in connections:
                    order = ["rest", "grpc"] if (r + c) % 2 == 0 else ["grpc", "rest"]
                    for kind in order:
                        if kind == "rest":
                            got = rest_load(server.port, c, seconds, files)
                        else:
                            got = grpc_load(grpc_port, c, seconds, request, args.client_processes)
                        results[c][kind].append(got)
                        print(
                            f"round {r + 1}/{rounds}, {c} connections, {kind}: "
                            f"{got['requests_per_s']:.0f} req/s, p50 {got['p50_ms']:.2f} ms, "
                            f"p99 {got['p99_ms']:.2f} ms",
                            flush=True,
                        )
        finally:
            server.proc.terminate()
            server.proc.wait(timeout=60)

    summary, rows = {}, []
    for c in connections:
        m = {
            kind: {k: med([run[k] for run in runs]) for k in runs[0]}
            for kind, runs in results[c].items()
        }
        ratio = m["grpc"]["requests_per_s"] / m["rest"]["requests_per_s"]
        summary[str(c)] = {**m, "grpc_over_rest_requests_per_s": ratio}
        rows.append(
            [
                c,
                f"{m['rest']['requests_per_s']:.0f}",
                f"{m['grpc']['requests_per_s']:.0f}",
                f"{ratio:.2f}",
                f"{m['rest']['p50_ms']:.2f} / {m['rest']['p99_ms']:.2f}",
                f"{m['grpc']['p50_ms']:.2f} / {m['grpc']['p99_ms']:.2f}",
            ]
        )
    header = ["conns", "REST req/s", "gRPC req/s", "gRPC/REST", "REST p50/p99 ms", "gRPC p50/p99"]
    print(table(f"\nbatch-1 binary tensors, medians of {rounds} rounds", header, rows))
    result = {
        "connections": summary,
        "rounds": rounds,
        "seconds": seconds,
        "quick": args.quick,
        "environment": environment(),
    }
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
