"""Every endpoint of the server, with raw HTTP and with tritonclient.http as a real client."""

import gzip
import json
import threading

import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import (
    binary_body,
    concurrently,
    http_post,
    json_body,
    output_of,
    parse_responses,
    raw_exchange,
    request,
)
from tritonclient.utils import InferenceServerException

INFER = "/v2/models/digits/infer"


def get_json(port, path, headers=None):
    status, _, body = request(port, "GET", path, headers=headers)
    return status, json.loads(body) if body else None


def test_health_and_metadata(server):
    port = server.port
    assert get_json(port, "/v2/health/live") == (200, {"live": True})
    assert get_json(port, "/v2/health/ready") == (200, {"ready": True})
    status, meta = get_json(port, "/v2")
    assert status == 200 and meta["name"] == "jaxmint-serve"
    assert "binary_tensor_data" in meta["extensions"] and meta["version"]
    status, model = get_json(port, "/v2/models/digits")
    assert status == 200 and model["platform"] == "jaxmint/xla"
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert model["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert get_json(port, "/v2/models/digits/versions/1")[1] == model
    assert get_json(port, "/v2/models/digits/ready")[0] == 200
    assert get_json(port, "/v2/models/digits/versions/1/ready")[0] == 200
    status, config = get_json(port, "/v2/models/digits/config")
    assert status == 200 and config["max_batch_size"] == 32


def test_unknown_paths_models_and_methods(server):
    port = server.port
    status, body = get_json(port, "/v2/models/nope")
    assert status == 404 and "nope" in body["error"] and "digits" in body["error"]
    assert get_json(port, "/v2/models/nope/ready")[0] == 404
    assert get_json(port, "/v2/models/digits/versions/2")[0] == 404
    assert get_json(port, "/v3")[0] == 404
    assert request(port, "POST", "/v2/models/nope/infer", b"{}")[0] == 404
    status, headers, body = request(port, "GET", INFER)
    assert status == 405 and headers["Allow"] == "POST" and "error" in json.loads(body)
    assert request(port, "POST", "/v2/health/live", b"")[0] == 405


def test_json_infer_with_id_nested_data_and_keep_alive(server, predictor, inputs):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for i in range(3):  # one connection, several requests
        x = inputs[i : i + 2]
        req = json.loads(json_body(x, f"req-{i}"))
        req["inputs"][0]["data"] = x.tolist()  # nested lists are accepted too
        conn.request("POST", INFER, json.dumps(req), {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200 and response.getheader("Connection") is None
        assert json.loads(body)["id"] == f"req-{i}"
        np.testing.assert_allclose(
            output_of(200, dict(response.getheaders()), body),
            predictor.run({"x": x})["output"],
            rtol=1e-5,
            atol=1e-6,
        )
    conn.close()


def test_binary_infer_and_gzip_body(server, predictor, inputs):
    body, headers = binary_body(inputs[:5], "b1")
    status, got_headers, got = request(server.port, "POST", INFER, body, headers)
    assert "Inference-Header-Content-Length" in got_headers
    want = predictor.run({"x": inputs[:5]})["output"]
    np.testing.assert_allclose(output_of(status, got_headers, got), want, rtol=1e-5, atol=1e-6)
    zipped = gzip.compress(json_body(inputs[:5]))
    status, got_headers, got = request(
        server.port, "POST", INFER, zipped, {"Content-Encoding": "gzip"}
    )
    np.testing.assert_allclose(output_of(status, got_headers, got), want, rtol=1e-5, atol=1e-6)
    status, _, got = request(server.port, "POST", INFER, zipped, {"Content-Encoding": "br"})
    assert status == 415


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient(server, predictor, inputs, binary):
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.get_model_metadata("digits")["inputs"][0]["shape"] == [-1, 64]
    x = inputs[:4]
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    want = predictor.run({"x": x})["output"]
    if binary:  # tritonclient's defaults: binary in, all outputs binary out
        result = client.infer("digits", [tensor], request_id="t1")
    else:
        outputs = [triton.InferRequestedOutput("output", binary_data=False)]
        result = client.infer("digits", [tensor], outputs=outputs, request_id="t1")
    assert result.get_response()["id"] == "t1"
    assert ("parameters" in result.get_output("output")) == binary
    np.testing.assert_allclose(result.as_numpy("output"), want, rtol=1e-5, atol=1e-6)
    bad = triton.InferInput("x", [2, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 63), np.float32), binary_data=binary)
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("digits", [bad])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [tensor])
    client.close()


def test_bearer_token(make_server, inputs):
    server = make_server(token="s3cret")
    port, good = server.port, {"Authorization": "Bearer s3cret"}
    assert request(port, "GET", "/v2/health/live")[0] == 200  # probes need no token
    assert request(port, "GET", "/v2/health/ready")[0] == 200
    for path in ("/v2", "/v2/models/digits", "/v2/models/digits/ready", "/metrics"):
        status, headers, _ = request(port, "GET", path)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert request(port, "GET", path, headers={"Authorization": "Bearer nope"})[0] == 401
        assert request(port, "GET", path, headers=good)[0] == 200
    assert request(port, "POST", INFER, json_body(inputs[:1]))[0] == 401
    assert request(port, "POST", INFER, json_body(inputs[:1]), good)[0] == 200
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput("x", [1, 64], "FP32").set_data_from_numpy(inputs[:1])
    assert client.infer("digits", [tensor], headers=good).as_numpy("output").shape == (1, 10)
    with pytest.raises(InferenceServerException, match="bearer token"):
        client.infer("digits", [tensor])
    client.close()


def test_body_and_element_limits(make_server, predictor, inputs):
    server = make_server(max_body_bytes=4000, max_elements=64 * 8)
    port = server.port
    big = json_body(inputs[:20])  # > 4000 bytes
    ((status, headers, body),) = parse_responses(raw_exchange(port, http_post(INFER, big)))
    assert status == 413 and "--max-body-bytes" in json.loads(body)["error"]
    # a small body that decompresses past the limit is refused too
    bomb = gzip.compress(b" " * 100_000)
    status, _, body = request(port, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert status == 413
    body, headers = binary_body(inputs[:9])  # 9 x 64 elements > 512
    status, _, got = request(port, "POST", INFER, body, headers)
    assert status == 400 and "--max-elements" in json.loads(got)["error"]
    # still serving
    status, headers, got = request(port, "POST", INFER, json_body(inputs[:2]))
    np.testing.assert_allclose(
        output_of(status, headers, got),
        predictor.run({"x": inputs[:2]})["output"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_pipelined_requests_are_answered_in_order(server, predictor, inputs):
    stream = b""
    for i in range(40):
        if i % 2:
            stream += b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        else:
            body = json_body(inputs[i : i + 1], str(i))
            stream += http_post(INFER, body).replace(b"Connection: close\r\n", b"")
    stream += b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers = parse_responses(raw_exchange(server.port, stream))
    assert len(answers) == 41 and all(status == 200 for status, _, _ in answers)
    for i, (status, headers, body) in enumerate(answers[:40]):
        if i % 2:
            assert json.loads(body) == {"live": True}
        else:
            assert json.loads(body)["id"] == str(i)
            want = predictor.run({"x": inputs[i : i + 1]})["output"]
            np.testing.assert_allclose(output_of(status, headers, body), want, rtol=1e-5, atol=1e-6)
    assert json.loads(answers[40][2]) == {"ready": True}


def test_headers_too_large_and_chunked_bodies(server):
    data = b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    ((status, _, _),) = parse_responses(raw_exchange(server.port, data))
    assert status == 431
    data = (
        b"POST "
        + INFER.encode()
        + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    ((status, _, _),) = parse_responses(raw_exchange(server.port, data))
    assert status == 501
    ((status, _, _),) = parse_responses(raw_exchange(server.port, b"GET /v2 HTTP/2.0\r\n\r\n"))
    assert status == 505


def test_metrics(server, inputs):
    port = server.port
    for _ in range(3):
        assert request(port, "POST", INFER, json_body(inputs[:2]))[0] == 200
    assert request(port, "POST", INFER, b"{not json")[0] == 400
    status, headers, body = request(port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, kind in [
        ("jaxmint_inference_requests", "counter"),
        ("jaxmint_http_requests", "counter"),
        ("jaxmint_inference_request_duration_seconds", "histogram"),
        ("jaxmint_batch_size", "histogram"),
        ("jaxmint_queue_depth", "gauge"),
        ("jaxmint_open_connections", "gauge"),
        ("jaxmint_process_peak_rss_bytes", "gauge"),
        ("process_cpu_seconds", "counter"),  # prometheus_client's process collector
        ("process_resident_memory_bytes", "gauge"),
    ]:
        assert families[name].type == kind, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    digits = (("model", "digits"), ("version", "1"))

    def value(name, *labels):
        return samples[(name, tuple(sorted((*digits, *labels))))]

    assert value("jaxmint_inference_requests_total", ("code", "200")) == 3
    assert value("jaxmint_inference_requests_total", ("code", "400")) == 1
    assert value("jaxmint_inference_request_duration_seconds_count") == 3
    assert value("jaxmint_batch_size_sum") == 6
    assert value("jaxmint_batch_size_bucket", ("le", "+Inf")) == 3
    assert value("jaxmint_queue_depth") == 0
    assert samples[("process_resident_memory_bytes", ())] > 10e6
    assert samples[("jaxmint_process_peak_rss_bytes", ())] >= 10e6
    assert server.metrics.requests("digits", 200) == 3


def test_metrics_in_openmetrics_when_asked(server):
    accept = "application/openmetrics-text; version=1.0.0"
    status, headers, body = request(server.port, "GET", "/metrics", headers={"Accept": accept})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    families = {f.name for f in openmetrics_families(body.decode())}
    assert {"jaxmint_inference_requests", "jaxmint_batch_size"} <= families
    assert body.endswith(b"# EOF\n")


def test_concurrent_requests_are_merged_into_batches(make_server, predictor, inputs):
    server = make_server(max_delay_ms=100, batch_on="thread")  # the worker's window
    n = 16
    results = concurrently(server.port, INFER, n, lambda i: json_body(inputs[i : i + 1]))
    assert len(results) == n
    for i, response in results.items():
        np.testing.assert_allclose(
            output_of(*response),
            predictor.run({"x": inputs[i : i + 1]})["output"],
            rtol=1e-5,
            atol=1e-6,
        )
    counts = server.metrics.batch_counts("digits")
    batches = counts[float("inf")]
    assert batches < n, f"{n} concurrent requests ran as {batches} batches: nothing merged"
    assert counts[1.0] < batches  # some batch held more than one example


def test_no_batching_runs_each_request_alone(make_server, inputs):
    server = make_server(batching=False)
    threads = [
        threading.Thread(target=request, args=(server.port, "POST", INFER, json_body(inputs[:1])))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    counts = server.metrics.batch_counts("digits")
    assert counts[1.0] == counts[float("inf")] == 8
