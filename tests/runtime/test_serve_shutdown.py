"""Graceful shutdown: SIGTERM to a real jaxmint-serve process, and Server.stop in-process."""

import copy
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import json_body, output_of, request

from jaxmint_runtime import Predictor
from jaxmint_runtime.serve import Server

INFER = "/v2/models/digits/infer"


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "jaxmint-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "jaxmint_runtime.serve"]


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"jaxmint-serve printed nothing in {timeout} s: {proc.stderr.read()[-2000:]}")


def queue_depth(port: int, headers: dict) -> float:
    _, _, body = request(port, "GET", "/metrics", headers=headers)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "jaxmint_queue_depth" and sample.labels["model"] == "digits":
                return sample.value
    return -1


def test_sigterm_answers_in_flight_requests_then_exits_0(artifact, predictor, inputs):
    token = {"Authorization": "Bearer tok"}
    env = {**os.environ, "JAXMINT_SERVE_TOKEN": "tok", "JAX_PLATFORMS": "cpu"}
    # Batches wait up to 20 s to fill: the requests are still queued when SIGTERM comes.
    args = ["--port", "0", "--max-delay-ms", "20000", "--batch-window", "fixed"]
    args += ["--log-level", "WARNING"]
    proc = subprocess.Popen(
        [*serve_command(), str(artifact), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = first_line(proc, timeout=120)
        assert "listening on http://127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        assert request(port, "GET", "/v2", headers=None)[0] == 401  # the token came from the env
        n, results = 6, {}

        def client(i):
            body = json_body(inputs[i : i + 1], str(i))
            results[i] = request(port, "POST", INFER, body, token, timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 15
        while queue_depth(port, token) < n:
            assert time.monotonic() < deadline, "the requests never reached the queue"
            time.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        answered = time.monotonic() - signalled
        assert proc.wait(timeout=60) == 0
        assert sorted(results) == list(range(n))
        for i, (status, headers, body) in results.items():
            assert json.loads(body)["id"] == str(i)
            want = predictor.run({"x": inputs[i : i + 1]})["output"]
            np.testing.assert_allclose(output_of(status, headers, body), want, rtol=1e-5, atol=1e-6)
        assert answered < 15, "draining waited for the batch delay instead of running at once"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_stop_refuses_new_connections_while_finishing_in_flight(predictor, inputs):
    slow = copy.copy(predictor)
    slow.run = lambda arrays: (time.sleep(1.0), Predictor.run(predictor, arrays))[1]
    server = Server([slow], port=0, max_delay_ms=0).start()
    port, result = server.port, {}
    worker = threading.Thread(
        target=lambda: result.update(r=request(port, "POST", INFER, json_body(inputs[:1])))
    )
    worker.start()
    time.sleep(0.3)  # the request is inside the slow model now (it sleeps 1 s)
    stopper = threading.Thread(target=lambda: result.update(drained=server.stop(timeout=10)))
    stopper.start()
    time.sleep(0.2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    worker.join(timeout=30)
    stopper.join(timeout=30)
    status, headers, body = result["r"]
    assert status == 200 and headers["Connection"] == "close" and result["drained"] is True
    np.testing.assert_allclose(
        output_of(status, headers, body),
        predictor.run({"x": inputs[:1]})["output"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_cli_refuses_bad_arguments(artifact, tmp_path, capsys):
    from jaxmint_runtime.serve import main

    assert main([str(tmp_path / "missing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main([str(artifact), "--max-queue", "0"]) == 2
    assert "--max-queue must be at least 1" in capsys.readouterr().err
    assert main([str(artifact), str(artifact)]) == 2  # one name, served twice
    assert "unique" in capsys.readouterr().err
