"""Open Inference Protocol v2 messages: decode an infer request, encode its response.

Pure functions over bytes and numpy; no sockets, threads or clocks. Both the JSON
tensor form and Triton's binary tensor extension are read and written:

- request: a JSON header, optionally followed by raw little-endian tensor bytes
  when the ``Inference-Header-Content-Length`` HTTP header gives the JSON length;
  each binary input carries ``parameters.binary_data_size`` and the chunks follow
  in the order of the inputs;
- response: outputs come back binary when the request asks with
  ``outputs[i].parameters.binary_data`` or ``parameters.binary_data_output``
  (tritonclient's default), else as flat JSON lists.

``parameters`` objects hold strings, booleans and finite numbers only. The
request's own parameters, other than the ones the protocol reads, are passed
through: the response carries them back. Triton's classification extension
(``outputs[i].parameters.classification = k``) answers the top ``k`` entries of
the output's last dimension as BYTES strings ``"value:index[:label]"``, highest
first, with the labels of the artifact's ``labels.txt``.

Everything a client can get wrong raises `ProtocolError` (a 400 by default) whose
message names the tensor and what to change, before any large allocation.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from jaxmint_runtime._format import np_dtype
from jaxmint_runtime._predictor import InputError, Predictor

# numpy dtype name -> v2 datatype. BYTES (strings) has no jaxmint equivalent.
DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
    "object": "BYTES",  # classification strings, answered only
}
NUMPY_NAMES = {v: k for k, v in DATATYPES.items()}
MODEL_VERSION = "1"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "parameters")
REQUEST_PARAMETERS = ("binary_data_output",)  # read here, not passed through
MAX_PARAMETERS = 64
MAX_PARAMETER_CHARS = 4096
INT64 = (-(2**63), 2**63 - 1)


@functools.lru_cache(maxsize=64)
def datatype_of(dtype: np.dtype) -> str:
    """The protocol's datatype of a numpy dtype (``KeyError`` for one it cannot carry).

    Cached by dtype: numpy computes a dtype's name in Python on every call."""
    return DATATYPES[dtype.name]


class ProtocolError(ValueError):
    """The request cannot be served; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class OutputRequest:
    """One output a request asks for, and how."""

    name: str
    binary: bool = False  # raw bytes after the JSON header (REST)
    classification: int | None = None  # the top k as "value:index[:label]" strings


@dataclass
class InferRequest:
    """A decoded, validated infer request: arrays ready for `Predictor.run`."""

    id: str | None
    arrays: dict[str, np.ndarray]
    batch: int
    outputs: list[OutputRequest]
    parameters: dict[str, Any] = field(default_factory=dict)  # passed through to the response


def v2_shape(shape: tuple) -> list[int]:
    """A TensorSpec shape in v2 form: every symbolic dimension becomes -1."""
    return [-1 if isinstance(d, str) else int(d) for d in shape]


def model_metadata(predictor: Predictor, versions: list[str] | None = None) -> dict:
    def tensor(spec):
        return {"name": spec.name, "datatype": DATATYPES[spec.dtype], "shape": v2_shape(spec.shape)}

    metadata = {
        "name": predictor.name,
        "versions": versions or [MODEL_VERSION],
        "platform": f"jaxmint/{predictor.backend_name}",
        "inputs": [tensor(s) for s in predictor.inputs],
        "outputs": [tensor(s) for s in predictor.outputs],
    }
    if predictor.buckets is not None:  # the batch sizes that run without a compile
        metadata["parameters"] = {"batch_buckets": predictor.buckets}
    return metadata


# -- decoding --------------------------------------------------------------------------
def decode_infer(
    body: bytes,
    header_length: int | None,
    predictor: Predictor,
    *,
    max_elements: int,
) -> InferRequest:
    """Parse and validate one infer request body for ``predictor``.

    Args:
      header_length: the ``Inference-Header-Content-Length`` value, or None when
        the whole body is JSON.
      max_elements: the most elements one input tensor may declare.
    """
    if header_length is None:
        _check_json_size(body)
        head, binary = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length is {header_length} but the body has "
                f"{len(body)} bytes; it must be the length of the JSON part"
            )
        head, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as e:  # also bad UTF-8 and nesting deeper than 1024
        if "infinity" in str(e) or head[e.pos : e.pos + 9].lstrip(b"-").startswith(_NONFINITE):
            raise ProtocolError(
                f"the request holds NaN or infinity at byte {e.pos}; inputs must be finite "
                "numbers (JSON has neither)"
            ) from None
        raise ProtocolError(f"the request is not valid JSON ({_short(e)})") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(request, "the request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    outputs = requested_outputs(request.get("outputs"), predictor, binary_default)

    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    specs = {s.name: s for s in predictor.inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise ProtocolError(f"inputs[{i}] must be an object with name, shape, datatype")
        name = item.get("name")
        if not isinstance(name, str) or name not in specs:
            raise ProtocolError(
                f"inputs[{i}] has name {name!r}; this model's inputs are {sorted(specs)}"
            )
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        spec = specs[name]
        datatype = item.get("datatype")
        want = DATATYPES[spec.dtype]
        if datatype != want:
            raise ProtocolError(
                f"input {name!r} has datatype {datatype!r}; the model expects {want}"
            )
        shape = check_shape(item.get("shape"), name, max_elements)
        count = math.prod(shape)
        dtype = np_dtype(spec.dtype)
        params = _parameters(item, f"input {name!r}")
        if "shared_memory_region" in params:
            raise ProtocolError(f"input {name!r}: shared memory is not supported by this server")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size")
            arr = _from_binary(binary, offset, size, count, dtype, name)
            offset += size
        elif "data" in item:
            arr = _from_json(item["data"], dtype, count, name, datatype)
        else:
            raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
        arrays[name] = arr.reshape(shape)
    if offset != len(binary):
        raise ProtocolError(
            f"the body has {len(binary)} bytes after the JSON header but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    try:
        arrays, batch = predictor.validate(arrays, check_finite=True)
    except InputError as e:
        raise ProtocolError(str(e)) from None

    passed = {k: v for k, v in parameters.items() if k not in REQUEST_PARAMETERS}
    return InferRequest(request_id, arrays, batch, outputs, passed)


_NONFINITE = (b"NaN", b"Infinity")
_SHAPE = re.compile(rb'(?<!\\)"shape"\s*:\s*\[([0-9,\s]*)\]')
_CHARS_PER_VALUE = 40  # "-1.2345678901234567e-300, " and nesting, generously
_JSON_SLACK = 64 * 1024


def _check_json_size(body: bytes) -> None:
    """Refuse a JSON body far larger than its declared shapes can need, before parsing.

    Parsing builds Python objects several times the body's size, so a 64 MB body
    whose ``data`` does not match its ``shape`` would cost most of a gigabyte and
    seconds of the event loop before the mismatch shows. The shapes are found with a
    cheap scan; a body without them is parsed and checked as usual.
    """
    if len(body) <= _JSON_SLACK:
        return
    shapes = _SHAPE.findall(body)
    if not shapes:
        return
    declared = 0
    for dims in shapes:
        values = [int(d) for d in dims.split(b",") if d.strip()]
        declared += math.prod(values)
    bound = _JSON_SLACK + declared * _CHARS_PER_VALUE
    if len(body) > bound:
        raise ProtocolError(
            f"the JSON body has {len(body)} bytes but its inputs declare {declared} elements "
            f"in all, which need at most about {bound}; send data that matches 'shape', or "
            "binary tensors for large inputs"
        )


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f"'parameters' of {where} must be an object")
    return check_parameters(params, where)


def check_parameters(params: dict, where: str) -> dict:
    """``params`` if each value is a string, a boolean or a finite number (int64 for
    integers), with at most `MAX_PARAMETERS` keys; else a `ProtocolError` naming it."""
    if len(params) > MAX_PARAMETERS:
        raise ProtocolError(
            f"the parameters of {where} have {len(params)} keys; at most {MAX_PARAMETERS}"
        )
    for key, value in params.items():
        if len(key) > 256:
            raise ProtocolError(f"a parameter name of {where} is longer than 256 characters")
        if isinstance(value, str):
            ok = len(value) <= MAX_PARAMETER_CHARS
        elif isinstance(value, bool):
            ok = True
        elif isinstance(value, int):
            ok = INT64[0] <= value <= INT64[1]
        elif isinstance(value, float):
            ok = math.isfinite(value)
        else:
            ok = False
        if not ok:
            raise ProtocolError(
                f"parameter {key[:64]!r} of {where} is {_short_value(value)}; a parameter is "
                f"a string (at most {MAX_PARAMETER_CHARS} characters), a boolean or a finite "
                "number (an integer within int64)"
            )
    return params


def _short_value(value: Any) -> str:
    text = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY) if value is not None else b"null"
    return text[:40].decode(errors="replace") + ("..." if len(text) > 40 else "")


def check_shape(shape: Any, name: str, max_elements: int) -> list[int]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > 32:
        raise ProtocolError(f"input {name!r}: {len(shape)} dimensions is too many")
    if any(d > max_elements for d in shape):  # e.g. [2**62, 0]: no elements, no valid array
        raise ProtocolError(
            f"input {name!r}: shape {shape[:8]} has a dimension above the {max_elements} "
            "elements a tensor may have (--max-elements)"
        )
    count = math.prod(shape)
    if count > max_elements:
        raise ProtocolError(
            f"input {name!r} declares {count} elements (shape {shape}); this server accepts "
            f"at most {max_elements} per tensor (--max-elements)"
        )
    return shape


def _from_binary(binary, offset: int, size: Any, count: int, dtype: np.dtype, name: str):
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"input {name!r}: binary_data_size must be a non-negative integer")
    if size != count * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: binary_data_size is {size} bytes but its shape needs "
            f"{count} x {dtype.itemsize} = {count * dtype.itemsize}"
        )
    if offset + size > len(binary):
        raise ProtocolError(
            f"input {name!r}: its {size} binary bytes run past the end of the body "
            f"({len(binary) - offset} left)"
        )
    arr = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<"))
    if dtype == np.bool_ and arr.view(np.uint8).max(initial=0) > 1:
        raise ProtocolError(f"input {name!r}: BOOL bytes must be 0 or 1")
    return arr if arr.dtype == dtype else arr.astype(dtype)


_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}  # target kind -> JSON value kinds allowed


def _from_json(data: Any, dtype: np.dtype, count: int, name: str, datatype: str) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: 'data' must be a list (flat or nested)")
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise ProtocolError(
            f"input {name!r}: 'data' is not a regular array ({_short(e)})"
        ) from None
    if arr.size != count:
        raise ProtocolError(
            f"input {name!r}: 'data' has {arr.size} values but its shape needs {count}"
        )
    kind = "f" if dtype.kind == "V" else dtype.kind  # bfloat16 reports kind "V"
    if count and arr.dtype.kind not in _KINDS.get(kind, ""):
        got = {"b": "booleans", "U": "strings", "O": "mixed values"}.get(arr.dtype.kind, "numbers")
        raise ProtocolError(f"input {name!r}: 'data' holds {got}, which do not fit {datatype}")
    if count and kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ProtocolError(f"input {name!r}: a value in 'data' does not fit {datatype}")
    try:
        with np.errstate(over="raise"):
            return arr.astype(dtype).reshape(-1)
    except FloatingPointError:
        raise ProtocolError(
            f"input {name!r}: a value in 'data' is beyond the largest finite {datatype}"
        ) from None


def requested_outputs(
    wanted: Any, predictor: Predictor, binary_default: bool
) -> list[OutputRequest]:
    """The outputs a request's ``outputs`` list asks for (all of them when it is None)."""
    specs = {s.name: s for s in predictor.outputs}
    names = list(specs)
    if wanted is None:
        return [OutputRequest(n, binary_default) for n in names]
    if not isinstance(wanted, list):
        raise ProtocolError("'outputs' must be a list of {name, parameters} objects")
    if len(wanted) > len(names):
        raise ProtocolError(
            f"'outputs' lists {len(wanted)} entries; this model has {len(names)} outputs {names}"
        )
    result: list[OutputRequest] = []
    for i, item in enumerate(wanted):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise ProtocolError(f"outputs[{i}] asks for {name!r}; this model's outputs are {names}")
        if any(name == o.name for o in result):  # an answer may not be larger than asked for
            raise ProtocolError(f"outputs[{i}] asks for {name!r} again; name each output once")
        params = _parameters(item, f"output {name!r}")
        if "shared_memory_region" in params:
            raise ProtocolError(f"output {name!r}: shared memory is not supported by this server")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {name!r}: parameters.binary_data must be true or false")
        k = params.get("classification")
        if k is not None:
            _check_classification(specs[name], k)
        result.append(OutputRequest(name, binary, k))
    return result


def _check_classification(spec, k: Any) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ProtocolError(
            f"output {spec.name!r}: parameters.classification must be a positive integer "
            f"(how many top classes), got {_short_value(k)}"
        )
    if not spec.shape or spec.dtype == "bool":
        raise ProtocolError(
            f"output {spec.name!r} ({spec.dtype}, shape {list(spec.shape)}) has no classes to "
            "rank; classification needs a numeric output with a last dimension"
        )


def classify(array: np.ndarray, k: int, labels: list[str] | None = None) -> np.ndarray:
    """The top ``k`` entries of the last axis as ``"value:index[:label]"`` bytes, highest
    first (ties by lower index), in the shape ``(..., min(k, classes))``.

    Values are written as Triton writes them: ``%f`` for floating point, integers as
    they are.
    """
    k = min(k, array.shape[-1])
    key = array.astype(np.float64)
    order = np.argsort(-key, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(array, order, axis=-1)
    floating = array.dtype.kind in "fV"  # bfloat16 reports kind "V"
    out = np.empty(order.shape, dtype=object)
    flat_out, flat_order, flat_values = out.reshape(-1), order.reshape(-1), values.reshape(-1)
    for i, (index, value) in enumerate(zip(flat_order.tolist(), flat_values.tolist(), strict=True)):
        text = f"{value:f}:{index}" if floating else f"{int(value)}:{index}"
        if labels is not None:
            text += ":" + labels[index]
        flat_out[i] = text.encode()
    return out


def answer_outputs(
    outputs: Mapping[str, np.ndarray],
    requested: list[OutputRequest],
    labels: Mapping[str, list[str]],
) -> list[tuple[OutputRequest, np.ndarray]]:
    """The requested outputs in order, classification applied (BYTES as object arrays)."""
    answers = []
    for want in requested:
        arr = np.asarray(outputs[want.name])
        if want.classification is not None:
            arr = classify(arr, want.classification, labels.get(want.name))
        answers.append((want, arr))
    return answers


def bytes_tensor(arr: np.ndarray) -> bytes:
    """A BYTES tensor in the protocol's binary form: each element's length (uint32,
    little-endian), then its bytes, in row-major order."""
    parts = []
    for item in arr.reshape(-1):
        parts += [len(item).to_bytes(4, "little"), item]
    return b"".join(parts)


def raw_tensor(arr: np.ndarray) -> bytes:
    """Any output's bytes for binary transport (little-endian; BYTES length-prefixed)."""
    if arr.dtype == object:
        return bytes_tensor(arr)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# -- encoding --------------------------------------------------------------------------
def encode_infer(
    model_name: str,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
    labels: Mapping[str, list[str]] | None = None,
    version: str = MODEL_VERSION,
) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length."""
    tensors, chunks = [], []
    for want, arr in answer_outputs(outputs, request.outputs, labels or {}):
        datatype = datatype_of(arr.dtype)
        tensor: dict[str, Any] = {"name": want.name, "datatype": datatype, "shape": list(arr.shape)}
        if want.binary:
            raw = raw_tensor(arr)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            tensor["data"] = [item.decode() for item in arr.reshape(-1)]
        else:
            # JSON has no bfloat16; its values are exact in float32.
            flat = arr.astype(np.float32) if datatype == "BF16" else arr
            tensor["data"] = np.ascontiguousarray(flat.reshape(-1))
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": version}
    if request.id is not None:
        response["id"] = request.id
    if request.parameters:
        response["parameters"] = request.parameters
    response["outputs"] = tensors
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
