"""The protocol beyond plain infer: classification with labels, parameters passed through,
the extensions advertised, FP16 and BF16 tensors; with tritonclient over REST and gRPC."""

import hashlib
import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from runtime_helpers import DIGIT_NAMES, json_body, request
from tritonclient.utils import InferenceServerException

import jaxmint
import jaxmint_runtime
from jaxmint.export import ExportError, export_model
from jaxmint_runtime import ArtifactError
from jaxmint_runtime.serve import Server
from jaxmint_runtime.serve._protocol import classify

INFER = "/v2/models/digits/infer"


@pytest.fixture
def server(make_server):
    return make_server(grpc_port=0)


def top_k(logits: np.ndarray, k: int, labels=DIGIT_NAMES) -> np.ndarray:
    """Triton's classification strings, computed here from the runtime's logits."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return np.array(
        [
            [f"{logits[i, j]:f}:{j}:{labels[j]}".encode() for j in row]
            for i, row in enumerate(order)
        ],
        dtype=object,
    )


def texts(arr: np.ndarray) -> list:
    return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in arr.tolist()]


def test_the_artifact_carries_its_labels(artifact, predictor):
    assert (artifact / "labels.txt").read_text().splitlines() == DIGIT_NAMES
    assert predictor.labels == {"output": DIGIT_NAMES}


@pytest.mark.parametrize("binary", [True, False])
def test_classification_over_rest(server, predictor, inputs, binary):
    client = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    x = inputs[:4]
    tensor = thttp.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = thttp.InferRequestedOutput("output", binary_data=binary, class_count=3)
    result = client.infer("digits", [tensor], outputs=[wanted])
    (out,) = result.get_response()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [4, 3]
    want = top_k(predictor.run({"x": x})["output"], 3)
    assert texts(result.as_numpy("output")) == texts(want)  # JSON gives str, binary bytes


def test_classification_over_grpc_and_k_beyond_the_classes(server, predictor, inputs):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    x = inputs[:2]
    tensor = tgrpc.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    wanted = tgrpc.InferRequestedOutput("output", class_count=50)  # clipped to the 10 classes
    result = client.infer("digits", [tensor], outputs=[wanted])
    assert result.get_output("output").datatype == "BYTES"
    logits = predictor.run({"x": x})["output"]
    np.testing.assert_array_equal(result.as_numpy("output"), top_k(logits, 10))


def test_classify_without_labels_and_for_integers():
    logits = np.array([[0.5, 2.0, -1.0], [3.0, 3.0, 1.0]], np.float32)
    assert classify(logits, 2).tolist() == [
        [b"2.000000:1", b"0.500000:0"],
        [b"3.000000:0", b"3.000000:1"],  # ties: the lower index first
    ]
    assert classify(np.array([4, 9, 1], np.int32), 1).tolist() == [b"9:1"]


def test_classification_is_refused_where_it_cannot_apply(server, inputs):
    for k in (0, -2, "3", True, 1.5):
        req = json.loads(json_body(inputs[:1]))
        req["outputs"] = [{"name": "output", "parameters": {"classification": k}}]
        status, _, body = request(server.port, "POST", INFER, json.dumps(req).encode())
        assert status == 400, k
        assert "classification must be a positive integer" in json.loads(body)["error"]


def test_request_parameters_are_checked_and_passed_through(server, inputs):
    given = {"trace_id": "abc-1", "attempt": 2, "weight": 0.5, "debug": False}
    x = inputs[:1]
    rest = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    tensor = thttp.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    response = rest.infer("digits", [tensor], parameters=given).get_response()
    assert response["parameters"] == given

    grpc_client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    tensor = tgrpc.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    given = {k: v for k, v in given.items() if k != "weight"}  # its client sends no floats
    response = grpc_client.infer("digits", [tensor], parameters=given).get_response()
    echoed = {
        k: getattr(p, p.WhichOneof("parameter_choice")) for k, p in response.parameters.items()
    }
    assert echoed == given

    # Nulls, lists, objects, integers beyond int64 and huge strings are refused by name.
    for bad in (None, [1], {"a": 1}, 2**64 - 1, "x" * 5000):
        req = json.loads(json_body(x))
        req["parameters"] = {"trace_id": bad}
        status, _, body = request(server.port, "POST", INFER, json.dumps(req).encode())
        message = json.loads(body)["error"]
        assert status == 400 and "parameter 'trace_id' of the request" in message, bad
    tensor = tgrpc.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        grpc_client.infer("digits", [tensor], priority=2**63 + 5)  # a uint64_param
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "parameter 'priority'" in e.value.message()


def test_extensions_are_advertised_on_both_ports(server):
    status, _, body = request(server.port, "GET", "/v2")
    assert status == 200
    extensions = set(json.loads(body)["extensions"])
    assert {"binary_tensor_data", "classification", "parameters"} <= extensions
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert set(client.get_server_metadata().extensions) == extensions


def test_versioned_paths(server, inputs):
    path = "/v2/models/digits/versions/1/infer"
    status, _, body = request(server.port, "POST", path, json_body(inputs[:1], "v"))
    assert status == 200 and json.loads(body)["model_version"] == "1"
    assert request(server.port, "GET", "/v2/models/digits/versions/1/ready")[0] == 200
    status, _, body = request(server.port, "POST", "/v2/models/digits/versions/2/infer")
    assert status == 404 and "it serves versions ['1']" in json.loads(body)["error"]


# -- labels: written by the exporter, checked by the runtime --------------------------------
def test_export_refuses_labels_that_do_not_fit(tmp_path):
    from runtime_helpers import train_digits

    model, variables, test = train_digits(steps=1)
    for labels, match in [
        (["a", "b"], "2 labels for output 'output' of shape"),
        ([*DIGIT_NAMES[:9], "new\nline"], "label 9 of output 'output'"),
        ({"logits": DIGIT_NAMES}, "the model's outputs are"),
        ("0123456789", "a list of class names"),
    ]:
        with pytest.raises(ExportError, match=match):
            export_model(model, variables, test["x"][:4], tmp_path / "a", name="d", labels=labels)
        assert not (tmp_path / "a").exists()  # refused before anything was written


def rehash(artifact, rel: str) -> None:
    """Make the manifest list ``rel`` as it is now: a consistent, hostile artifact."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    data = (artifact / rel).read_bytes()
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (artifact / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"a\nb\n", "2 labels for output 'output'"),
        ("\n".join([*DIGIT_NAMES[:9], "bell\x07"]).encode(), "line 10 is not a label"),
        (b"\xff\xfe" * 10, "labels must be UTF-8"),
    ],
)
def test_the_runtime_refuses_hostile_labels(artifact, tmp_path, content, match):
    copy = shutil.copytree(artifact, tmp_path / "digits")
    (copy / "labels.txt").write_bytes(content)
    with pytest.raises(ArtifactError, match="sha256 does not match|the manifest says"):
        jaxmint_runtime.load(copy, warmup=False)
    rehash(copy, "labels.txt")
    with pytest.raises(ArtifactError, match=match):
        jaxmint_runtime.load(copy, warmup=False)


def test_labels_file_must_be_listed(artifact, tmp_path):
    copy = shutil.copytree(artifact, tmp_path / "digits")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["outputs"][0]["labels"] = "other.txt"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outputs\\[0\\].labels names 'other.txt'"):
        jaxmint_runtime.load(copy, warmup=False)


# -- half precision -------------------------------------------------------------------------
def half_model():
    """A model with an FP16 input and FP16 and BF16 outputs."""

    def init(key, x):
        return {"w": jnp.linspace(-1, 1, 4 * 3, dtype=jnp.float32).reshape(4, 3)}

    def apply(variables, x, *, train=False, key=None):
        y = x.astype(jnp.float32) @ variables["w"]
        return {"half": y.astype(jnp.float16), "brain": y.astype(jnp.bfloat16)}

    return jaxmint.models.Model(init, apply)


@pytest.fixture(scope="module")
def half_artifact(tmp_path_factory):
    model = half_model()
    x = np.arange(8 * 4, dtype=np.float16).reshape(8, 4) / 16
    variables = model.init(None, x)
    out = tmp_path_factory.mktemp("half") / "half"
    return export_model(model, variables, x, out, name="half", batch_sizes=[1, 8])


def test_fp16_and_bf16_over_rest_and_grpc(half_artifact):
    predictor = jaxmint_runtime.load(half_artifact)
    x = (np.arange(3 * 4, dtype=np.float16).reshape(3, 4) - 5) / 8
    want = predictor.run({"x": x})
    assert want["half"].dtype == np.float16 and want["brain"].dtype == ml_dtypes.bfloat16
    with Server([predictor], port=0, grpc_port=0) as server:
        meta = json.loads(request(server.port, "GET", "/v2/models/half")[2])
        assert meta["inputs"][0]["datatype"] == "FP16"
        assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
            "half": "FP16",
            "brain": "BF16",
        }
        rest = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
        for binary in (True, False):
            tensor = thttp.InferInput("x", list(x.shape), "FP16")
            tensor.set_data_from_numpy(x, binary_data=binary)
            outs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in ("half", "brain")]
            result = rest.infer("half", [tensor], outputs=outs)
            np.testing.assert_array_equal(result.as_numpy("half"), want["half"])
            # tritonclient hands BF16 back as float32, which holds every bfloat16 exactly
            np.testing.assert_array_equal(
                result.as_numpy("brain"), want["brain"].astype(np.float32)
            )
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        tensor = tgrpc.InferInput("x", list(x.shape), "FP16")
        tensor.set_data_from_numpy(x)
        result = client.infer("half", [tensor])
        np.testing.assert_array_equal(result.as_numpy("half"), want["half"])
        np.testing.assert_array_equal(result.as_numpy("brain"), want["brain"].astype(np.float32))
        wanted = tgrpc.InferRequestedOutput("half", class_count=2)  # ranks FP16 values too
        top = client.infer("half", [tensor], outputs=[wanted]).as_numpy("half")
        np.testing.assert_array_equal(top, classify(want["half"], 2))
