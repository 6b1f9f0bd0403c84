"""Hostile clients of a real `jaxmint-serve` server on loopback.

Each attack is followed by a correct request on a fresh connection to the same
server, which must get the correct answer. Every loop is bounded in time.
"""

from __future__ import annotations

import json
import socket
import time

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from security_helpers import parse_responses, raw_exchange

import jaxmint_runtime
from jaxmint_runtime.serve import Server
from jaxmint_runtime.serve._protocol import ProtocolError, decode_infer

INFER = "/v2/models/tiny/infer"


@pytest.fixture(scope="module")
def tiny(genuine):
    return jaxmint_runtime.load(genuine[0])


@pytest.fixture
def serve(tiny):
    started = []

    def make(**config):
        server = Server([tiny], port=0, **config).start()
        started.append(server)
        return server

    yield make
    for server in started:
        assert server.stop(timeout=10)


def _infer_body(x: np.ndarray) -> bytes:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def _post(body: bytes, extra: str = "", target: str = INFER) -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _correct_answer_follows(server, tiny, sample, headers: str = ""):
    x = sample[:2]
    (status, _, body), *_ = parse_responses(
        raw_exchange(server.port, _post(_infer_body(x), headers + "Connection: close\r\n"))
    )
    assert status == 200, body[:300]
    (out,) = json.loads(body)["outputs"]
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(out["shape"]), tiny(x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /v2 HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nHost: a\r\nBa\x00d: x\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\n\r\n", 400),
        ("POST /v2 HTTP/1.1\r\nHost: a\r\nContent-Length: ²\r\n\r\n".encode(), 400),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
        (b"GET /v2 HTTP/1.1\r\nHost: a\r\nX: " + b"b" * 70_000 + b"\r\n\r\n", 431),
        # CL.TE and TE.CL smuggling: both framings at once is a malformed request.
        (
            b"POST /v2 HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n0\r\n\r\nGET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        (
            b"POST /v2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3"
            b"\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
            400,
        ),
        # A chunked body alone is well-formed, and not supported: 501 before the body.
        (
            b"POST /v2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n",
            501,
        ),
        # obs-fold (a header continued on the next line) is refused, not reinterpreted.
        (b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n", 400),
    ],
    ids=[
        "space-in-name",
        "nul-in-name",
        "duplicate-host",
        "missing-host",
        "superscript-length",
        "long-request-line",
        "long-header",
        "cl-te",
        "te-cl",
        "chunked",
        "obs-fold",
    ],
)
def test_framing_attacks_get_one_answer_and_a_closed_connection(serve, tiny, sample, raw, status):
    server = serve()
    answers = parse_responses(raw_exchange(server.port, raw))
    assert [a[0] for a in answers] == [status]  # and nothing smuggled after it
    assert answers[0][1].get("connection") == "close"
    assert "error" in json.loads(answers[0][2])
    _correct_answer_follows(server, tiny, sample)


def test_a_bare_lf_never_desynchronizes_the_stream(serve, tiny, sample):
    server = serve()
    body = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n"  # would be a smuggled request
    raw = (
        b"POST /v2/models/tiny/ready HTTP/1.1\r\nHost: a\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    answers = parse_responses(raw_exchange(server.port, raw))
    # One request with a body, or a refusal: never the body answered as a second request.
    assert len(answers) == 1, answers
    _correct_answer_follows(server, tiny, sample)


def test_pipelining_with_a_bad_request_in_the_middle(serve, tiny, sample):
    server = serve()
    good = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n"
    raw = good + b"GET /v2 HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n" + good
    answers = parse_responses(raw_exchange(server.port, raw))
    assert [a[0] for a in answers] == [200, 400]  # the stream is closed after the bad one
    _correct_answer_follows(server, tiny, sample)


def test_head_replies_carry_no_body(serve):
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n")
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_end = data.index(b"\r\n\r\n") + 4
    head = data[:head_end].decode()
    assert head.startswith("HTTP/1.1 200") and "content-length: 13" in head.lower()
    ((status, _, body),) = parse_responses(data[head_end:])  # the GET follows at once
    assert status == 200 and json.loads(body) == {"live": True}


def test_the_token_is_checked_before_the_body_is_read(serve, tiny, sample):
    server = serve(token="s3cret")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        # A 60 MiB body announced, not a byte of it sent: the answer comes at once.
        s.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: a\r\nContent-Length: {60 << 20}\r\n\r\n".encode()
        )
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert time.monotonic() - t0 < 5
    ((status, headers, _),) = parse_responses(data)
    assert status == 401 and headers.get("connection") == "close"
    _correct_answer_follows(server, tiny, sample, headers="Authorization: Bearer s3cret\r\n")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_strangers_cannot_make_the_server_buffer_their_bodies(serve, tiny, sample):
    """Four connections without the token push 16 MiB each of a 60 MiB body: the server
    answers 401 from the headers and never holds their bytes (4 x 16 MiB otherwise)."""
    server = serve(token="s3cret")
    before = _rss_bytes()
    chunk = b"\0" * (1 << 20)
    deadline = time.monotonic() + 30
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    try:
        for s in sockets:  # all four stay open while the memory is measured
            s.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: a\r\nContent-Length: {60 << 20}\r\n\r\n".encode()
            )
            try:
                for _ in range(16):
                    s.sendall(chunk)
                    assert time.monotonic() < deadline
            except OSError:  # the server closed the connection after its 401: expected
                pass
        grown = _rss_bytes() - before
    finally:
        for s in sockets:
            s.close()
    assert grown < 24 << 20, f"the process grew by {grown >> 20} MiB"
    _correct_answer_follows(server, tiny, sample, headers="Authorization: Bearer s3cret\r\n")


def test_noise_bytes_do_not_keep_a_connection_open(serve, tiny, sample):
    server = serve(read_timeout_s=0.5, idle_timeout_s=60.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        deadline = time.monotonic() + 5
        closed = False
        while time.monotonic() < deadline:
            try:
                s.sendall(b"\r\n")
                if s.recv(65536, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
    assert closed, "a connection sending only line ends was kept open"
    _correct_answer_follows(server, tiny, sample)


def test_repeated_output_names_are_refused_before_any_work(serve, tiny, sample):
    server = serve()
    tensor = {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}
    body = json.dumps({"inputs": [tensor], "outputs": [{"name": "output"}] * 2_000}).encode()
    ((status, _, answer),) = parse_responses(
        raw_exchange(server.port, _post(body, "Connection: close\r\n"))
    )
    assert status == 400 and len(answer) < 1000
    assert "outputs" in json.loads(answer)["error"]
    _correct_answer_follows(server, tiny, sample)


@pytest.mark.parametrize("shape", [[2**62, 0], [0, 2**62], [2**40, 2**40, 0]])
def test_huge_dimensions_are_a_400_not_a_500(serve, tiny, sample, shape):
    server = serve()
    tensor = {"name": "x", "shape": shape, "datatype": "FP32", "data": []}
    body = json.dumps({"inputs": [tensor]}).encode()
    ((status, _, answer),) = parse_responses(
        raw_exchange(server.port, _post(body, "Connection: close\r\n"))
    )
    assert status == 400, answer
    assert "dimension" in json.loads(answer)["error"]
    assert server.metrics.requests("tiny", 500) == 0
    _correct_answer_follows(server, tiny, sample)


_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.floats(),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _request_like(draw_value, shape, data, outputs):
    tensor = {"name": "x", "shape": shape, "datatype": "FP32", "data": data}
    request = {"inputs": [tensor]}
    if outputs is not None:
        request["outputs"] = outputs
    if draw_value is not None:
        request["parameters"] = draw_value
    return json.dumps(request).encode()


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(
    extra=_JSON,
    shape=st.one_of(_JSON, st.lists(st.integers(-3, 2**63), max_size=4)),
    data=st.one_of(_JSON, st.lists(st.floats(width=32), max_size=20)),
    outputs=st.one_of(st.none(), _JSON),
    header_length=st.one_of(st.none(), st.integers(-5, 400)),
    tail=st.binary(max_size=64),
)
def test_decoders_answer_every_input_with_a_request_or_a_protocol_error(
    tiny, extra, shape, data, outputs, header_length, tail
):
    body = _request_like(extra, shape, data, outputs) + (tail if header_length else b"")
    try:
        decoded = decode_infer(body, header_length, tiny, max_elements=1 << 20)
    except ProtocolError as e:
        assert 400 <= e.status < 500
        return
    assert decoded.arrays["x"].shape[1:] == (8,)
    assert len({name for name, _ in decoded.outputs}) == len(decoded.outputs)


def test_one_client_cannot_hold_every_connection(serve, tiny, sample):
    server = serve(max_connections_per_client=3, max_connections=100)
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        time.sleep(0.2)  # let the server count them
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        ((status, headers, body),) = parse_responses(data)
        assert status == 429 and headers.get("retry-after") == "1"
        assert "--max-connections-per-client" in json.loads(body)["error"]
    finally:
        silent.pop().close()
    time.sleep(0.2)  # one slot is free again
    _correct_answer_follows(server, tiny, sample)
    for s in silent:
        s.close()


def test_batch_sizes_fall_in_buckets_compiled_at_start(serve, tiny, sample):
    server = serve(max_batch_size=8)
    ((status, _, body),) = parse_responses(
        raw_exchange(server.port, b"GET /v2/models/tiny HTTP/1.1\r\nHost: a\r\n\r\n")
    )
    assert json.loads(body)["parameters"]["batch_buckets"] == [1, 2, 4, 8]
    served = server.models["tiny"]
    assert set(served.executables) == {1, 2, 4, 8}  # warmed when the server started
    rng = np.random.default_rng(0)
    cases = [rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 5, 6, 7, 9, 13, 17)]
    wants = [np.concatenate([tiny(x[i : i + 1]) for i in range(len(x))]) for x in cases]
    symbolic = served.backend._fn(None)  # the jitted symbolic module: one entry per size
    compiled = symbolic._cache_size()
    for x, want in zip(cases, wants, strict=True):  # padded or chunked, never compiled
        (status, _, answer), *_ = parse_responses(
            raw_exchange(server.port, _post(_infer_body(x), "Connection: close\r\n"))
        )
        assert status == 200, answer[:200]
        (out,) = json.loads(answer)["outputs"]
        got = np.array(out["data"]).reshape(out["shape"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert symbolic._cache_size() == compiled


def test_a_huge_json_body_that_does_not_match_its_shape_is_refused_unparsed(serve, tiny, sample):
    server = serve(max_body_bytes=64 << 20)
    tensor = {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 4_000_000}
    body = json.dumps({"inputs": [tensor]}).encode()
    assert len(body) > 16 << 20
    t0 = time.monotonic()
    ((status, _, answer),) = parse_responses(
        raw_exchange(server.port, _post(body, "Connection: close\r\n"), timeout=30)
    )
    elapsed = time.monotonic() - t0
    assert status == 400 and "declare 8 elements" in json.loads(answer)["error"]
    assert elapsed < 5, f"refusing took {elapsed:.1f} s"
    _correct_answer_follows(server, tiny, sample)


def test_a_slow_body_gets_408_from_its_first_byte(serve, tiny, sample):
    server = serve(read_timeout_s=0.6)
    body = _infer_body(sample[:1])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(_post(body)[: -len(body) // 2])
        t0 = time.monotonic()
        for _ in range(20):  # a trickle of bytes does not extend the deadline
            time.sleep(0.1)
            try:
                s.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    ((status, _, _),) = parse_responses(data)
    assert status == 408 and time.monotonic() - t0 < 5
    _correct_answer_follows(server, tiny, sample)


def test_a_client_that_half_closes_mid_request_is_let_go(serve, tiny, sample):
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(_post(b'{"inputs": [')[:-4])
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert s.recv(65536) == b""  # closed without an answer to half a request
    assert time.monotonic() - t0 < 2
    _correct_answer_follows(server, tiny, sample)
