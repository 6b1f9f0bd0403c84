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

Everything a client can get wrong raises `ProtocolError` (a 400 by default) whose
message names the tensor and what to change, before any large allocation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
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
}
NUMPY_NAMES = {v: k for k, v in DATATYPES.items()}
MODEL_VERSION = "1"


class ProtocolError(ValueError):
    """The request cannot be served; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    """A decoded, validated infer request: arrays ready for `Predictor.run`."""

    id: str | None
    arrays: dict[str, np.ndarray]
    batch: int
    outputs: list[tuple[str, bool]]  # (output name, send as binary)


def v2_shape(shape: tuple) -> list[int]:
    """A TensorSpec shape in v2 form: every symbolic dimension becomes -1."""
    return [-1 if isinstance(d, str) else int(d) for d in shape]


def model_metadata(predictor: Predictor) -> dict:
    def tensor(spec):
        return {"name": spec.name, "datatype": DATATYPES[spec.dtype], "shape": v2_shape(spec.shape)}

    metadata = {
        "name": predictor.name,
        "versions": [MODEL_VERSION],
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

    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    return InferRequest(request_id, arrays, batch, _outputs(request, predictor, binary_default))


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
    return params


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


def _outputs(request: dict, predictor: Predictor, binary_default: bool) -> list[tuple[str, bool]]:
    names = [s.name for s in predictor.outputs]
    wanted = request.get("outputs")
    if wanted is None:
        return [(n, binary_default) for n in names]
    if not isinstance(wanted, list):
        raise ProtocolError("'outputs' must be a list of {name, parameters} objects")
    if len(wanted) > len(names):
        raise ProtocolError(
            f"'outputs' lists {len(wanted)} entries; this model has {len(names)} outputs {names}"
        )
    result = []
    for i, item in enumerate(wanted):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise ProtocolError(f"outputs[{i}] asks for {name!r}; this model's outputs are {names}")
        if any(name == n for n, _ in result):  # an answer may not be larger than asked for
            raise ProtocolError(f"outputs[{i}] asks for {name!r} again; name each output once")
        params = _parameters(item, f"output {name!r}")
        if "classification" in params or "shared_memory_region" in params:
            raise ProtocolError(
                f"output {name!r}: classification and shared memory are not supported"
            )
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {name!r}: parameters.binary_data must be true or false")
        result.append((name, binary))
    return result


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# -- encoding --------------------------------------------------------------------------
def encode_infer(
    model_name: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    requested: list[tuple[str, bool]],
) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length."""
    tensors, chunks = [], []
    for name, binary in requested:
        arr = outputs[name]
        datatype = DATATYPES[str(arr.dtype)]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            # JSON has no bfloat16; its values are exact in float32.
            flat = arr.astype(np.float32) if datatype == "BF16" else arr
            tensor["data"] = np.ascontiguousarray(flat.reshape(-1))
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = tensors
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
