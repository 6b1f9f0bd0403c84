"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``).

Served by `grpc.aio` on the server's own event loop, beside the HTTP transport: the
same models, batchers, limits, bearer token and metrics. Needs the ``[grpc]``
extra (grpcio and protobuf); the messages are generated from
``grpc_proto/open_inference.proto`` (``scripts/gen_grpc.sh``).
"""

from __future__ import annotations

import hmac
import math
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np

from jaxmint_runtime import __version__
from jaxmint_runtime._format import np_dtype
from jaxmint_runtime._predictor import InputError, Predictor
from jaxmint_runtime.serve import _protocol
from jaxmint_runtime.serve._batcher import QueueFull
from jaxmint_runtime.serve.grpc_proto import open_inference_pb2 as pb
from jaxmint_runtime.serve.grpc_proto import open_inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from jaxmint_runtime.serve._server import Served, Server

# Where each datatype's values travel when a request sends them in `contents`.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_STATUS = {  # the HTTP status a ProtocolError carries -> the gRPC code Triton answers
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
OPEN_METHODS = ("ServerLive", "ServerReady")  # answered without a token


def decode_infer(
    request: pb.ModelInferRequest, predictor: Predictor, *, max_elements: int
) -> _protocol.InferRequest:
    """Validate a `ModelInferRequest` into arrays for ``predictor`` (`ProtocolError`)."""
    specs = {s.name: s for s in predictor.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise _protocol.ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of the inputs"
        )
    if not request.inputs:
        raise _protocol.ProtocolError("the request needs at least one input")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name not in specs:
            raise _protocol.ProtocolError(
                f"inputs[{i}] has name {name!r}; this model's inputs are {sorted(specs)}"
            )
        if name in arrays:
            raise _protocol.ProtocolError(f"input {name!r} is given twice")
        spec = specs[name]
        want = _protocol.DATATYPES[spec.dtype]
        if tensor.datatype != want:
            raise _protocol.ProtocolError(
                f"input {name!r} has datatype {tensor.datatype!r}; the model expects {want}"
            )
        shape = _protocol.check_shape(list(tensor.shape), name, max_elements)
        count, dtype = math.prod(shape), np_dtype(spec.dtype)
        if raw:
            if tensor.HasField("contents"):
                raise _protocol.ProtocolError(f"input {name!r} has both contents and raw bytes")
            if len(raw[i]) != count * dtype.itemsize:
                raise _protocol.ProtocolError(
                    f"input {name!r} has {len(raw[i])} raw bytes; shape {shape} of {want} "
                    f"needs {count * dtype.itemsize}"
                )
            array = np.frombuffer(raw[i], dtype.newbyteorder("<")).astype(dtype, copy=False)
        else:
            field = _CONTENTS.get(want)
            if field is None:
                raise _protocol.ProtocolError(
                    f"input {name!r} of {want} must be sent as raw_input_contents"
                )
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise _protocol.ProtocolError(
                    f"input {name!r} has {len(values)} values in contents.{field}; shape "
                    f"{shape} needs {count}"
                )
            with np.errstate(over="raise", invalid="raise"):
                try:
                    array = np.asarray(values).astype(dtype)
                except FloatingPointError:
                    raise _protocol.ProtocolError(
                        f"input {name!r} holds values beyond the range of {want}"
                    ) from None
            if array.dtype.kind in "iu" and not np.array_equal(array, np.asarray(values)):
                raise _protocol.ProtocolError(f"input {name!r} holds values beyond {want}")
        arrays[name] = array.reshape(shape)
    try:
        arrays, batch = predictor.validate(arrays, check_finite=True)
    except InputError as e:
        raise _protocol.ProtocolError(str(e)) from None
    wanted = None
    if request.outputs:
        wanted = [
            {"name": o.name, "parameters": parameters(o.parameters, f"output {o.name!r}")}
            for o in request.outputs
        ]
    outputs = _protocol.requested_outputs(wanted, predictor, binary_default=True)
    passed = parameters(request.parameters, "the request")
    return _protocol.InferRequest(request.id or None, arrays, batch, outputs, passed)


def parameters(params, where: str) -> dict:
    """A protobuf ``map<string, InferParameter>`` as a dict, checked like REST's."""
    values = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        values[key] = None if kind is None else getattr(param, kind)  # unset: refused
    return _protocol.check_parameters(values, where)


def set_parameters(target, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = value


def encode_infer(
    served: Served, request: _protocol.InferRequest, outputs: dict
) -> pb.ModelInferResponse:
    """A `ModelInferResponse` with every requested output as raw little-endian bytes."""
    response = pb.ModelInferResponse(
        model_name=served.model, model_version=served.version, id=request.id or ""
    )
    labels = served.predictor.labels
    set_parameters(response.parameters, request.parameters)
    for want, array in _protocol.answer_outputs(outputs, request.outputs, labels):
        tensor = response.outputs.add()
        tensor.name = want.name
        tensor.datatype = _protocol.datatype_of(array.dtype)
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(_protocol.raw_tensor(array))
    return response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The six RPCs of the protocol, answered from a `Server`'s models and batchers."""

    def __init__(self, server: Server):
        self.server = server

    async def _admit(self, context, method: str) -> None:
        token = self.server._token
        if token is None or method in OPEN_METHODS:
            return
        given = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(given.encode("latin-1", "replace"), b"Bearer " + token):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token: send metadata 'authorization: Bearer TOKEN'",
            )

    async def _model(self, context, name: str, version: str) -> Served:
        try:
            return self.server.route(name, version)
        except LookupError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self.server.draining)

    async def ModelReady(self, request, context):
        await self._admit(context, "ModelReady")
        await self._model(context, request.name, request.version)
        return pb.ModelReadyResponse(ready=not self.server.draining)

    async def ServerMetadata(self, request, context):
        await self._admit(context, "ServerMetadata")
        return pb.ServerMetadataResponse(
            name="jaxmint-serve", version=__version__, extensions=list(self.server.extensions)
        )

    async def ModelMetadata(self, request, context):
        await self._admit(context, "ModelMetadata")
        served = await self._model(context, request.name, request.version)
        versions = self.server.served.get(served.model, {})
        listed = [served.version] if request.version else sorted(versions, key=int)
        meta = _protocol.model_metadata(served.predictor, listed)
        response = pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(response, kind).add(
                    name=t["name"], datatype=t["datatype"], shape=t["shape"]
                )
        return response

    async def ModelInfer(self, request, context):
        received = time.monotonic()
        await self._admit(context, "ModelInfer")
        served = await self._model(context, request.model_name, request.model_version)
        name, version, server = served.model, served.version, self.server
        try:
            decoded = decode_infer(
                request, served.predictor, max_elements=server.config.max_elements
            )
            outputs = await server.submit(served, decoded, received)
        except _protocol.ProtocolError as e:
            server.metrics.infer(name, version, e.status)
            await context.abort(_STATUS.get(e.status, grpc.StatusCode.UNKNOWN), str(e))
        except QueueFull as e:
            server.metrics.infer(name, version, 503)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return encode_infer(served, decoded, outputs)


def make_server(server: Server, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A `grpc.aio` server for ``server`` on ``host:port`` (0: any free port), not started."""
    limit = server.config.max_body_bytes
    aio = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=server.config.max_connections * 4,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(server), aio)
    try:
        bound = aio.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc's word for a port that is taken or not ours
        bound = 0
    if bound == 0:
        raise OSError(f"the gRPC port {host}:{port} is taken or not ours to bind")
    return aio, bound
