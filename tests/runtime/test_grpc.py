"""The gRPC half of the protocol, with tritonclient.grpc as a real client (sync and asyncio)."""

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from jaxmint_runtime.serve._cli import main as serve_main

TOKEN = "s3cret-token"


@pytest.fixture
def server(make_server):
    return make_server(grpc_port=0)


def infer_input(array, name="x", datatype="FP32"):
    tensor = tgrpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_metadata_and_infer_match_the_runtime_and_rest(server, predictor, inputs):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    meta = client.get_server_metadata()
    assert meta.name == "jaxmint-serve" and "binary_tensor_data" in meta.extensions
    model = client.get_model_metadata("digits")
    assert model.platform == "jaxmint/xla" and list(model.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("x", "FP32", [-1, 64])]
    assert [(t.name, list(t.shape)) for t in model.outputs] == [("output", [-1, 10])]

    batch = inputs[:5]
    result = client.infer("digits", [infer_input(batch)], request_id="req-7")
    want = predictor({"x": batch})
    np.testing.assert_array_equal(result.as_numpy("output"), want)
    assert result.get_response().id == "req-7"
    raw = result.get_response().raw_output_contents[0]  # the raw bytes, little-endian FP32
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(5, 10), want)
    rest = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    rest_input = thttp.InferInput("x", [5, 64], "FP32")
    rest_input.set_data_from_numpy(batch)
    via_rest = rest.infer("digits", [rest_input]).as_numpy("output")
    np.testing.assert_array_equal(via_rest, result.as_numpy("output"))

    outputs = [tgrpc.InferRequestedOutput("output")]
    again = client.infer("digits", [infer_input(batch)], outputs=outputs)
    np.testing.assert_array_equal(again.as_numpy("output"), want)


def test_the_asyncio_client_batches_concurrent_requests(server, predictor, inputs):
    async def run():
        client = tgrpc_aio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        try:
            rows = [inputs[i : i + 1] for i in range(16)]
            results = await asyncio.gather(
                *[client.infer("digits", [infer_input(r)]) for r in rows]
            )
            return [r.as_numpy("output") for r in results]
        finally:
            await client.close()

    got = asyncio.run(run())
    want = predictor({"x": inputs[:16]})
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-6, atol=1e-6)


def test_bad_requests_get_triton_codes_and_say_what_to_change(server, inputs):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")

    def refused(*args, **kwargs) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as e:
            client.infer(*args, **kwargs)
        return e.value

    e = refused("nope", [infer_input(inputs[:1])])
    assert e.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in e.message()
    e = refused("digits", [infer_input(inputs[:1], name="y")])
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "inputs are ['x']" in e.message()
    e = refused("digits", [infer_input(inputs[:1].astype(np.float64), datatype="FP64")])
    assert "expects FP32" in e.message()
    e = refused("digits", [infer_input(np.zeros((1, 63), np.float32))])
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "63" in e.message()
    e = refused("digits", [infer_input(inputs[:1])], model_version="2")
    assert "has no version '2'; it serves versions ['1']" in e.message()
    e = refused("digits", [infer_input(inputs[:1])], outputs=[tgrpc.InferRequestedOutput("z")])
    assert "asks for 'z'; this model's outputs are ['output']" in e.message()
    nan = inputs[:1].copy()
    nan[0, 3] = np.nan
    e = refused("digits", [infer_input(nan)])
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "NaN or infinity" in e.message()


def test_bearer_token_on_both_ports(make_server, inputs):
    server = make_server(grpc_port=0, token=TOKEN)
    target = f"127.0.0.1:{server.grpc_port}"
    client = tgrpc.InferenceServerClient(target)
    assert client.is_server_live()  # health stays open, as on REST
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [infer_input(inputs[:1])])
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException):
        client.infer("digits", [infer_input(inputs[:1])], headers={"authorization": "Bearer no"})
    good = {"authorization": f"Bearer {TOKEN}"}
    assert client.infer("digits", [infer_input(inputs[:1])], headers=good).as_numpy("output").shape
    rest = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    with pytest.raises(InferenceServerException):
        rest.get_model_metadata("digits")
    assert rest.get_model_metadata("digits", headers=good)["name"] == "digits"


def test_cli_refuses_a_taken_grpc_port(artifact, server, capsys):
    code = serve_main([str(artifact), "--port", "0", "--grpc-port", str(server.grpc_port)])
    assert code == 2
    assert "cannot listen" in capsys.readouterr().err
