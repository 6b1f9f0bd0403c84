"""Overload, malformed input by the hundred, and request timeouts: the server keeps serving."""

import json
import random
import threading
import time

import numpy as np
from runtime_helpers import (
    binary_body,
    http_post,
    json_body,
    output_of,
    parse_responses,
    raw_exchange,
    request,
)

INFER = "/v2/models/digits/infer"


def test_overload_answers_503_quickly_and_every_request_exactly_once(
    make_server, predictor, inputs
):
    # The batch waits 1.5 s to fill, so the queue (2 requests) overflows at once, even
    # when a loaded machine spreads the clients' arrivals over a second.
    server = make_server(max_queue=2, max_delay_ms=1500, batch_on="thread")
    n = 24
    responses: dict[int, list] = {}
    barrier = threading.Barrier(n)

    def client(i):
        barrier.wait(timeout=10)
        t = time.monotonic()
        # Connection: close and read to EOF: a second answer would show up in the stream.
        stream = raw_exchange(server.port, http_post(INFER, json_body(inputs[i : i + 1], str(i))))
        responses[i] = [(*r, time.monotonic() - t) for r in parse_responses(stream)]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(responses) == list(range(n)), "some request got no answer"
    codes = {}
    for i, answers in responses.items():
        assert len(answers) == 1, f"request {i} was answered {len(answers)} times"
        (status, headers, body, elapsed) = answers[0]
        codes[i] = status
        if status == 200:
            assert json.loads(body)["id"] == str(i)  # its own answer, not a neighbour's
            want = predictor.run({"x": inputs[i : i + 1]})["output"]
            np.testing.assert_allclose(output_of(status, headers, body), want, rtol=1e-5, atol=1e-6)
        else:
            assert status == 503 and headers["retry-after"] == "1"
            assert "--max-queue" in json.loads(body)["error"] and elapsed < 5
    assert 503 in codes.values() and 200 in codes.values()
    m = server.metrics
    assert m.requests("digits", 503) == list(codes.values()).count(503)
    assert m.requests("digits", 200) == list(codes.values()).count(200)


# (field, value) pairs that make a request invalid; "inputs" and "parameters" are top-level.
INVALID = [
    ("name", None),
    ("name", "y"),
    ("name", 3),
    ("datatype", "FP64"),
    ("datatype", "INT32"),
    ("datatype", "BYTES"),
    ("datatype", None),
    ("shape", [2, 65]),
    ("shape", [-1, 64]),
    ("shape", [2]),
    ("shape", []),
    ("shape", "2,64"),
    ("shape", [2, 64, 1]),
    ("shape", [2.0, 64]),
    ("shape", [True, 64]),
    ("shape", None),
    ("data", [1.0] * 127),
    ("data", [[1.0, 2.0], [3.0]]),
    ("data", ["a"] * 128),
    ("data", [True] * 128),
    ("data", [1e39] * 128),  # beyond float32: infinity once cast
    ("data", 3.5),
    ("data", {"a": 1}),
    ("data", None),
    ("data", [None] * 128),
    ("data", [[0.5] * 64, [0.5] * 63 + [[1]]]),
    ("id", 5),
    ("id", [1]),
    ("outputs", [{"name": "nope"}]),
    ("outputs", "output"),
    ("outputs", [3]),
    ("outputs", [{"name": "output", "parameters": {"binary_data": "yes"}}]),
    ("inputs", None),
    ("inputs", {}),
    ("inputs", [1]),
    ("inputs", []),
    ("parameters", [1]),
    ("parameters", {"binary_data_output": "x"}),
    ("parameters", {"trace": None}),
    ("parameters", {"trace": [1]}),
    ("parameters", {"trace": {"a": 1}}),
    ("parameters", {"trace": 2**64 - 1}),
    ("parameters", {"trace": "x" * 5000}),
    ("outputs", [{"name": "output", "parameters": {"classification": 0}}]),
    ("outputs", [{"name": "output", "parameters": {"classification": "3"}}]),
    ("outputs", [{"name": "output", "parameters": {"classification": True}}]),
]
TOP_LEVEL = {"id", "outputs", "inputs", "parameters"}


def _malformed(rng: random.Random, inputs: np.ndarray) -> bytes:
    """One malformed request, as raw bytes on the wire."""
    good = json.loads(json_body(inputs[:2]))
    kind = rng.randrange(8)
    if kind == 0:  # random bytes instead of HTTP
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 1:  # random bytes as the body
        return http_post(INFER, rng.randbytes(rng.randrange(0, 500)))
    if kind == 2:  # truncated or corrupted JSON
        text = json.dumps(good).encode()
        broken = text[: rng.randrange(len(text))] + rng.randbytes(rng.randrange(3))
        try:
            json.loads(broken)
            broken += b"{"  # keep it broken
        except ValueError:
            pass
        return http_post(INFER, broken)
    if kind == 3:  # wrong names, datatypes, shapes, lengths, types
        field, value = rng.choice(INVALID)
        (good if field in TOP_LEVEL else good["inputs"][0])[field] = value
        return http_post(INFER, json.dumps(good).encode())
    if kind == 4:  # huge declared sizes
        t = good["inputs"][0]
        t["shape"] = rng.choice([[10**9, 64], [2**62, 2**62], [1] * 40, [10**6, 10**6]])
        return http_post(INFER, json.dumps(good).encode())
    if kind == 5:  # NaN and infinities
        value = rng.choice(["NaN", "Infinity", "-Infinity", "1e400"])
        data = ", ".join([value] + ["0.0"] * 127)
        body = '{"inputs":[{"name":"x","shape":[2,64],"datatype":"FP32","data":[' + data + "]}]}"
        return http_post(INFER, body.encode())
    if kind == 6:  # binary extension with wrong sizes or header length
        body, headers = binary_body(inputs[:2])
        length = int(headers["Inference-Header-Content-Length"])
        change = rng.randrange(4)
        if change == 0:
            body = body[: rng.randrange(length, len(body))]
        elif change == 1:
            body += rng.randbytes(rng.randrange(1, 64))
        elif change == 2:
            headers["Inference-Header-Content-Length"] = rng.choice(
                [str(length + rng.randrange(1, 100)), "-3", "abc", "0", str(10**30)]
            )
        else:
            headers["Inference-Header-Content-Length"] = str(rng.randrange(1, length))
        return http_post(INFER, body, headers)
    # kind 7: broken HTTP framing
    return rng.choice(
        [
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{}",
            b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n",
            b"BAD\r\n\r\n",
            b"GET /v2/models/%ff%fe HTTP/1.1\r\n\r\n",
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}",  # short body
        ]
    )


def test_fuzz_malformed_requests_then_correct_answers(make_server, predictor, inputs):
    server = make_server(max_body_bytes=1 << 20, read_timeout_s=1.0)
    rng = random.Random(1234)
    statuses = []
    deadline = time.monotonic() + 60
    for _ in range(600):
        assert time.monotonic() < deadline, "the fuzz run took too long"
        stream = raw_exchange(server.port, _malformed(rng, inputs), timeout=10)
        for status, _, body in parse_responses(stream):
            statuses.append(status)
            assert 400 <= status < 500, (status, body[:300])
            assert json.loads(body)["error"]
    # 600 malformed requests; those that are not even HTTP may get no answer, the rest a 4xx
    assert len(statuses) >= 450
    for i in range(0, 32, 4):  # and correct requests still get correct answers
        x = inputs[i : i + 1 + i % 3]
        want = predictor.run({"x": x})["output"]
        got = output_of(*request(server.port, "POST", INFER, json_body(x)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        body, headers = binary_body(x)
        got = output_of(*request(server.port, "POST", INFER, body, headers))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert server.metrics.requests("digits", 500) == 0


def test_slow_clients_time_out(make_server):
    server = make_server(read_timeout_s=0.5)
    partial = b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(partial)  # and never the rest
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    ((status, _, _),) = parse_responses(data)
    assert status == 408


def test_timeouts_answer_504_once_and_model_errors_answer_500(predictor, inputs):
    import copy

    from jaxmint_runtime import Predictor
    from jaxmint_runtime.serve import Server

    slow = copy.copy(predictor)
    slow.run = lambda arrays: (time.sleep(1.5), Predictor.run(predictor, arrays))[1]
    with Server([slow], port=0, request_timeout_s=0.2, max_delay_ms=0) as server:
        stream = raw_exchange(server.port, http_post(INFER, json_body(inputs[:1])))
        ((status, _, body),) = parse_responses(stream)  # one answer, though the model ends later
        assert status == 504 and "within 0.2 s" in json.loads(body)["error"]
        time.sleep(1.5)
        assert server.metrics.requests("digits", 200) == 0

    def broken_run(arrays):
        raise RuntimeError("the accelerator caught fire")

    broken = copy.copy(predictor)
    broken.run = broken_run
    with Server([broken], port=0) as server:
        status, _, body = request(server.port, "POST", INFER, json_body(inputs[:1]))
        assert status == 500 and "caught fire" in json.loads(body)["error"]
        assert request(server.port, "GET", "/v2/health/live")[0] == 200


def test_expect_100_continue_and_connection_limit(make_server, inputs):
    import socket

    server = make_server(max_connections=2)
    body = json_body(inputs[:1])
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head)
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert parse_responses(data)[0][0] == 200
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)
        ((status, _, _),) = parse_responses(raw_exchange(server.port, b""))
        assert status == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert request(server.port, "GET", "/v2/health/live")[0] == 200
