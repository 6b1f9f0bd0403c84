"""jaxmint-serve against a peer server on the same model and protocol: MLServer.

Run (about 6 minutes on 2 CPU cores, plus a one-time install of the peer; needs
``wrk``, ``apt-get install -y wrk``)::

    python benchmarks/serving_peers.py            # full
    python benchmarks/serving_peers.py --quick    # a smoke run

Setup: the digits MLP (64 -> 64 -> 10) exported with the ``xla`` and ``onnx``
targets. Served through the Open Inference Protocol's REST API with JSON tensors
(the form every v2 server reads) by

- ``jaxmint-serve --backend onnx`` and ``--backend xla``, each with dynamic
  batching (the default) and with ``--no-batching``;
- MLServer 1.7.1 (``parallel_workers: 0``: one process, as jaxmint-serve) with a
  custom runtime that calls ONNX Runtime on the artifact's ``onnx/model.onnx``,
  installed by this script in its own virtual environment under
  ``~/.cache/jaxmint-bench/`` (uvloop is pinned below 0.23, which crashes
  MLServer's workers).

Load: ``wrk`` in its own process, batch-1 requests back to back from 1, 8 and 64
connections. Each variant runs alone (the others idle), variants take turns within
each round in an order that alternates, and the medians over rounds are reported.

Reported: requests/s, p50 and p99 per variant and connection count, the server's
CPU time per request (user + system of its process tree, from /proc, over the
run), each server's peak RSS, and the ratios the targets are about:

* (a) jaxmint (onnx, and xla) / MLServer requests/s at 64 connections: **>= 5**,
  with a lower p99;
* (b) batching / no batching requests/s at 64 connections: **>= 2** per backend;
* (c) p50 at 1 connection, batching - no batching: **<= 0.1 ms** (a lone
  request runs at once).

Written to ``benchmarks/results/serving_peers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
from _common import environment, med, table, write_result
from grpc_rest import rest_load, wrk_files
from serving import ServerProcess, payload

RESULTS = Path(__file__).resolve().parent / "results"
CONNECTIONS = (1, 8, 64)
MLSERVER = "1.7.1"
PEER_VENV = Path.home() / ".cache" / "jaxmint-bench" / f"mlserver-{MLSERVER}"

_BUILD = """
import sys, optax, jaxmint
from jaxmint.export import export_model
train, test = jaxmint.data.digits()
model = jaxmint.models.mlp((64,), 10)
result = jaxmint.fit(model, jaxmint.losses.softmax_cross_entropy(), optax.adam(1e-2), train,
                     steps=200, batch_size=64, progress=False)
export_model(model, {"params": result.params}, test["x"][:16], sys.argv[1], name="digits",
             targets=("xla", "onnx"))
"""

# The peer's runtime: decode the v2 request with MLServer's codec, run ONNX Runtime.
_PEER_RUNTIME = """
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxDigits(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        (y,) = self.session.run(None, {"x": x})
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("output", y)]
        )
"""


def peer_python() -> Path:
    """MLServer's interpreter, installing it on first use."""
    python = PEER_VENV / "bin" / "python"
    ok = (
        python.exists()
        and subprocess.run(
            [str(python), "-c", "import mlserver, onnxruntime"], capture_output=True
        ).returncode
        == 0
    )
    if not ok:
        print(f"installing MLServer {MLSERVER} into {PEER_VENV} ...", flush=True)
        shutil.rmtree(PEER_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [
                *(str(PEER_VENV / "bin" / "pip"), "install", "-q"),
                *(f"mlserver=={MLSERVER}", "onnxruntime>=1.18", "uvloop<0.23"),
            ],
            check=True,
        )
    return python


class PeerProcess:
    """MLServer serving the artifact's ONNX graph as model ``digits``."""

    def __init__(self, artifact: Path, workdir: Path):
        models = workdir / "mlserver"
        model = models / "digits"
        model.mkdir(parents=True)
        (model / "peer_runtime.py").write_text(textwrap.dedent(_PEER_RUNTIME))
        settings = {
            "name": "digits",
            "implementation": "peer_runtime.OnnxDigits",
            "parameters": {"uri": str(artifact / "onnx" / "model.onnx")},
        }
        (model / "model-settings.json").write_text(json.dumps(settings))
        self.port = _free_port()
        server = {
            "http_port": self.port,
            "grpc_port": _free_port(),
            "metrics_port": _free_port(),
            "parallel_workers": 0,
            "host": "127.0.0.1",
        }
        (models / "settings.json").write_text(json.dumps(server))
        mlserver = peer_python().parent / "mlserver"
        self.log = open(workdir / "mlserver.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [str(mlserver), "start", str(models)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=model,
        )

    def wait_ready(self, timeout: float = 180) -> PeerProcess:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/v2/models/digits/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MLServer exited with {self.proc.returncode}; see its log")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"MLServer was not ready within {timeout:g} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """Peak RSS of a process and its children (MLServer may fork), from /proc."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total / 2**20


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (MLServer may fork workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree so far, from /proc (utime, stime)."""
    ticks = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def check_answers(port: int, body: bytes, want: np.ndarray) -> None:
    """Every server gives the same answer before it is timed."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/digits/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())["outputs"][0]
    got = np.asarray(out["data"], np.float32).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--artifact", type=Path, default=None, help="a digits artifact (xla+onnx)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--seconds", type=float, default=None, help="per run; default 4")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_peers.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("serving_peers: needs wrk (apt-get install -y wrk)")
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    connections = (1, 64) if args.quick else CONNECTIONS
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_before = os.getloadavg()
    peer_python()  # install before anything is timed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifact = args.artifact
        if artifact is None:
            artifact = tmp / "digits"
            print("training and exporting the digits MLP (xla and onnx) ...", flush=True)
            subprocess.run([sys.executable, "-c", _BUILD, str(artifact)], check=True)
        x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
        body, headers = payload("json", x)
        files = wrk_files(tmp, body, headers)
        import jaxmint_runtime

        want = jaxmint_runtime.load(artifact, backend="onnx").run({"x": x})["output"]

        servers = {
            "jaxmint onnx batching": ServerProcess(artifact, "--backend", "onnx", "--no-grpc"),
            "jaxmint onnx no batching": ServerProcess(
                artifact, "--backend", "onnx", "--no-batching", "--no-grpc"
            ),
            "jaxmint xla batching": ServerProcess(artifact, "--backend", "xla", "--no-grpc"),
            "jaxmint xla no batching": ServerProcess(
                artifact, "--backend", "xla", "--no-batching", "--no-grpc"
            ),
        }
        peer = PeerProcess(artifact, tmp)
        results: dict[str, dict[int, list]] = {}
        try:
            ports = {name: s.wait_ready().port for name, s in servers.items()}
            ports[f"MLServer {MLSERVER}"] = peer.wait_ready().port
            pids = {name: s.proc.pid for name, s in servers.items()}
            pids[f"MLServer {MLSERVER}"] = peer.proc.pid
            for port in ports.values():
                check_answers(port, body, want)
                rest_load(port, 8, 1, files)  # warm-up
            results = {name: {c: [] for c in connections} for name in ports}
            names = list(ports)
            for r in range(rounds):
                for c in connections:
                    order = names if (r + c) % 2 == 0 else names[::-1]
                    for name in order:
                        before = cpu_seconds(pids[name])
                        got = rest_load(ports[name], c, seconds, files)
                        used = cpu_seconds(pids[name]) - before
                        got["cpu_us_per_request"] = 1e6 * used / max(got["requests"], 1)
                        results[name][c].append(got)
                        print(
                            f"round {r + 1}/{rounds} c={c:<3} {name:<26} "
                            f"{got['requests_per_s']:8.0f} req/s  p50 {got['p50_ms']:7.2f} ms  "
                            f"p99 {got['p99_ms']:7.2f} ms  "
                            f"server CPU {got['cpu_us_per_request']:6.0f} us/req",
                            flush=True,
                        )
            rss = {name: peak_rss_mib(pid) for name, pid in pids.items()}
        finally:
            for s in servers.values():
                s.stop()
            peer.stop()

    summary = {
        name: {
            str(c): {k: med([run[k] for run in runs]) for k in runs[0]} for c, runs in by_c.items()
        }
        for name, by_c in results.items()
    }
    rows = []
    for name, by_c in summary.items():
        for c, m in by_c.items():
            rps, p50, p99 = m["requests_per_s"], m["p50_ms"], m["p99_ms"]
            cpu = m["cpu_us_per_request"]
            rows.append(
                [
                    name,
                    c,
                    f"{rps:.0f}",
                    f"{p50:.2f}",
                    f"{p99:.2f}",
                    f"{cpu:.0f}",
                    f"{rss[name]:.0f}",
                ]
            )
    print()
    header = ["server", "conns", "req/s", "p50 ms", "p99 ms", "CPU us/req", "peak RSS MiB"]
    print(table("medians over rounds", header, rows))

    top = str(max(connections))
    peer_name = f"MLServer {MLSERVER}"
    peer_top = summary[peer_name][top]
    ratios = {}
    for backend in ("onnx", "xla"):
        ours = summary[f"jaxmint {backend} batching"]
        alone = summary[f"jaxmint {backend} no batching"]
        ratios[backend] = {
            "over_peer_requests_per_s": ours[top]["requests_per_s"] / peer_top["requests_per_s"],
            "p99_ms": ours[top]["p99_ms"],
            "peer_p99_ms": peer_top["p99_ms"],
            "batching_over_no_batching": ours[top]["requests_per_s"] / alone[top]["requests_per_s"],
            "cpu_per_request_over_peer": ours[top]["cpu_us_per_request"]
            / peer_top["cpu_us_per_request"],
            "p50_1conn_batching_minus_no_batching_ms": ours["1"]["p50_ms"] - alone["1"]["p50_ms"],
        }
        r = ratios[backend]
        print(
            f"{backend}: {r['over_peer_requests_per_s']:.1f}x the peer's req/s at {top} "
            f"connections (target >= 5), p99 {r['p99_ms']:.1f} ms vs {r['peer_p99_ms']:.1f} ms; "
            f"batching / no batching {r['batching_over_no_batching']:.2f}x (target >= 2); "
            f"p50 at 1 connection {r['p50_1conn_batching_minus_no_batching_ms']:+.3f} ms "
            f"(target <= 0.1); server CPU per request {r['cpu_per_request_over_peer']:.2f}x "
            "the peer's"
        )
    result = {
        "environment": environment(),
        "seconds": seconds,
        "rounds": rounds,
        "summary": summary,
        "peak_rss_mib": rss,
        "ratios": ratios,
    }
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
