"""v2 request decoding and response encoding, without a server."""

import json
import math
import warnings

import numpy as np
import pytest
from runtime_helpers import binary_body, json_body

from jaxmint_runtime.serve import ProtocolError
from jaxmint_runtime.serve._protocol import (
    InferRequest,
    OutputRequest,
    decode_infer,
    encode_infer,
    model_metadata,
)

LIMIT = 1 << 20


def decode(predictor, body, header_length=None):
    return decode_infer(body, header_length, predictor, max_elements=LIMIT)


def test_model_metadata_uses_v2_datatypes_and_minus_one_for_batch(predictor):
    meta = model_metadata(predictor)
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize("nested", [False, True])
def test_json_data_flat_or_nested(predictor, inputs, nested):
    x = inputs[:3]
    req = json.loads(json_body(x, "r1"))
    if nested:
        req["inputs"][0]["data"] = x.tolist()
    decoded = decode(predictor, json.dumps(req).encode())
    assert decoded.id == "r1" and decoded.batch == 3
    np.testing.assert_array_equal(decoded.arrays["x"], x)
    assert decoded.outputs == [OutputRequest("output", False)]


def test_binary_input_and_binary_outputs_by_default(predictor, inputs):
    body, headers = binary_body(inputs[:2])
    decoded = decode(predictor, body, int(headers["Inference-Header-Content-Length"]))
    np.testing.assert_array_equal(decoded.arrays["x"], inputs[:2])
    assert decoded.outputs == [OutputRequest("output", True)]


def test_requested_outputs_choose_their_form(predictor, inputs):
    body = json_body(inputs[:1], outputs=[{"name": "output", "parameters": {"binary_data": True}}])
    assert decode(predictor, body).outputs == [OutputRequest("output", True)]
    body = json_body(inputs[:1], outputs=[{"name": "output"}])
    assert decode(predictor, body).outputs == [OutputRequest("output", False)]


BAD = [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100000, "not valid JSON"),
    (b'{"inputs": []}', "non-empty 'inputs'"),
    (b'{"inputs": [{"name": "y", "shape": [1, 64], "datatype": "FP32", "data": []}]}', "'y'"),
    (b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP64", "data": []}]}', "FP32"),
    (b'{"inputs": [{"name": "x", "shape": [1, -64], "datatype": "FP32", "data": []}]}', "shape"),
    (b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [1]}]}', "1 values"),
    (b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}', "shape"),
    (b'{"inputs": [{"name": "x", "shape": [99999999, 99999], "datatype": "FP32"}]}', "elements"),
    (b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32"}]}', "neither"),
    (
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]}',
        "strings",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [1, 2]]}]}',
        "regular",
    ),
    (
        b'{"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        "'id'",
    ),
    (b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": 3}]}', "list"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=range(len(BAD)))
def test_malformed_requests_name_the_problem(predictor, body, message):
    with pytest.raises(ProtocolError, match=message) as e:
        decode(predictor, body)
    assert e.value.status == 400


def test_nan_and_infinity_are_refused(predictor, inputs):
    for value in ("NaN", "-Infinity", "1e999"):
        data = "[" + ", ".join([value] + ["0.5"] * 63) + "]"
        body = '{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": %s}]}'
        with pytest.raises(ProtocolError, match="NaN or infinity"):
            decode(predictor, (body % data).encode())
    x = inputs[:1].copy()
    x[0, 3] = np.nan
    body, headers = binary_body(x)
    with pytest.raises(ProtocolError, match="NaN or infinity"):
        decode(predictor, body, int(headers["Inference-Header-Content-Length"]))
    # Finite in JSON but not in the input's dtype: named, without a numpy warning.
    data = "[" + ", ".join(["1e39"] + ["0.5"] * 63) + "]"
    body = '{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": %s}]}'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ProtocolError, match="beyond the largest finite FP32"):
            decode(predictor, (body % data).encode())


def test_binary_sizes_must_add_up(predictor, inputs):
    body, headers = binary_body(inputs[:2])
    length = int(headers["Inference-Header-Content-Length"])
    with pytest.raises(ProtocolError, match="run past the end"):
        decode(predictor, body[:-4], length)
    with pytest.raises(ProtocolError, match="add up to"):
        decode(predictor, body + b"\0" * 4, length)
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
        decode(predictor, body, len(body) + 1)
    head = json.loads(body[:length])
    head["inputs"][0]["parameters"]["binary_data_size"] = 12
    header = json.dumps(head).encode()
    with pytest.raises(ProtocolError, match="binary_data_size is 12"):
        decode(predictor, header + body[length:], len(header))


def answer(request_id, *outputs, parameters=None):
    """The decoded request an answer is encoded for (only id, outputs, parameters matter)."""
    return InferRequest(request_id, {}, 0, list(outputs), parameters or {})


def test_non_finite_outputs_are_null_in_json_and_exact_in_binary():
    out = {"y": np.array([[np.nan, np.inf, -np.inf, 0.1]], np.float32)}
    body, _ = encode_infer("m", answer(None, OutputRequest("y")), out)
    assert json.loads(body)["outputs"][0]["data"] == [None, None, None, 0.1]  # valid JSON
    body, header_length = encode_infer("m", answer(None, OutputRequest("y", True)), out)
    np.testing.assert_array_equal(np.frombuffer(body[header_length:], "<f4"), out["y"][0])


def test_encode_json_and_binary(predictor, inputs):
    outputs = predictor.run({"x": inputs[:3]})
    body, header_length = encode_infer("digits", answer("id7", OutputRequest("output")), outputs)
    assert header_length is None
    msg = json.loads(body)
    assert msg["model_name"] == "digits" and msg["id"] == "id7"
    (out,) = msg["outputs"]
    assert out["datatype"] == "FP32" and out["shape"] == [3, 10]
    np.testing.assert_array_equal(
        np.asarray(out["data"], np.float32).reshape(3, 10), outputs["output"]
    )
    body, header_length = encode_infer(
        "digits", answer(None, OutputRequest("output", True)), outputs
    )
    head = json.loads(body[:header_length])
    assert "id" not in head
    size = head["outputs"][0]["parameters"]["binary_data_size"]
    assert size == math.prod(outputs["output"].shape) * 4 == len(body) - header_length
    np.testing.assert_array_equal(
        np.frombuffer(body[header_length:], "<f4").reshape(3, 10), outputs["output"]
    )
