"""Helpers for the runtime tests: a tiny artifact, raw HTTP exchanges, v2 request bodies."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from pathlib import Path

import numpy as np


def train_digits(steps: int = 20):
    """The digits MLP trained for a few steps: ``(model, variables, test data)``."""
    import optax

    import jaxmint

    train, test = jaxmint.data.digits()
    model = jaxmint.models.mlp((64,), 10)
    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        train,
        steps=steps,
        batch_size=64,
        progress=False,
    )
    return model, {"params": result.params}, test


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def build_artifact(out: Path, *, steps: int = 20) -> Path:
    """Train the digits MLP for a few steps and export it as the artifact "digits",
    with its class names in ``labels.txt``."""
    from jaxmint.export import export_model

    model, variables, test = train_digits(steps)
    return export_model(model, variables, test["x"][:16], out, name="digits", labels=DIGIT_NAMES)


def request(port: int, method: str, path: str, body: bytes = b"", headers=None, timeout=10):
    """One request on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def concurrently(port: int, path: str, n: int, body_of) -> dict[int, tuple]:
    """``n`` clients POST ``body_of(i)`` to ``path`` at once (released by a barrier);
    ``{i: (status, headers, body)}``, every client answered."""
    results, barrier = {}, threading.Barrier(n)

    def client(i):
        barrier.wait(timeout=10)
        results[i] = request(port, "POST", path, body_of(i), timeout=30)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == n
    return results


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, half-close, and read everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split a byte stream into HTTP responses (Content-Length framed)."""
    out = []
    while data:
        end = data.index(b"\r\n\r\n")
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        out.append((status, headers, data[end + 4 : end + 4 + length]))
        data = data[end + 4 + length :]
    return out


def http_post(path: str, body: bytes, headers: dict | None = None) -> bytes:
    """A whole HTTP/1.1 POST request with Connection: close, as bytes."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def json_body(x: np.ndarray, request_id: str | None = None, **extra) -> bytes:
    """A v2 JSON infer request for the digits model's input ``x``."""
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    req = {"inputs": [tensor], **extra}
    if request_id is not None:
        req["id"] = request_id
    return json.dumps(req).encode()


def binary_body(x: np.ndarray, request_id: str | None = None) -> tuple[bytes, dict]:
    """A binary-extension infer request: (body, headers)."""
    raw = x.astype("<f4").tobytes()
    head = {
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
    if request_id is not None:
        head["id"] = request_id
    header = json.dumps(head).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def output_of(status: int, headers: dict, body: bytes) -> np.ndarray:
    """The "output" tensor of a 200 infer response, JSON or binary."""
    assert status == 200, body[:500]
    headers = {k.lower(): v for k, v in headers.items()}
    length = headers.get("inference-header-content-length")
    head = json.loads(body[: int(length)] if length else body)
    (out,) = head["outputs"]
    if "data" in out:
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    raw = body[int(length) : int(length) + out["parameters"]["binary_data_size"]]
    return np.frombuffer(raw, "<f4").reshape(out["shape"])
