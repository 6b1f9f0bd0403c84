"""Weight-only quantization of a predict function, and the task metric that judges it.

Schemes (``export_model(..., quantize=...)``, ``jaxmint export --quantize``):

- ``bf16``: every floating-point weight of two or more dimensions (the matrices,
  embeddings, convolution kernels, which hold nearly all the bytes) is stored as
  bfloat16 and cast back to its dtype in the graph;
- ``int8-weights``: the same weights stored as int8 with one float32 scale per
  output channel (the last axis), symmetric: ``w ~= q * scale`` with
  ``scale = max|w| / 127`` over the other axes; the graph computes ``q * scale``.

Vectors (biases, norm scales) stay as they are. The quantized weights are plain
arrays in the artifact's weights file and ONNX initializers, so every target and
the runtime take them unchanged; the lowered function dequantizes.

- ``int8`` (the ONNX target only): ONNX Runtime's static quantization
  (`quantize_onnx_static`) of the float graph: weights and activations int8 with
  one scale per tensor, the activations' ranges calibrated (min-max) on a few
  hundred of the run's training inputs, in QDQ form, which ONNX Runtime fuses
  into integer kernels. (One scale per tensor is ONNX Runtime's default; per
  output channel lost more accuracy on digits when tried, 0.56 points against 0.28.)
  Weights and activations both lose precision, so the graph is not held to the
  float model's outputs (its parity errors are recorded, not judged); the check
  sample holds its own answers.

Every target is then held to the task metric (`task_metric`): the accuracy of its
argmax on the run's eval data against the float model's.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxmint.export._lower import ExportError
from jaxmint.export._targets import save_onnx

SCHEMES = ("none", "bf16", "int8-weights", "int8")
STATIC = "int8"  # quantizes activations too: ONNX Runtime's tools, on the ONNX target
SCALE_SUFFIX = ":scale"
MAX_EVAL_EXAMPLES = 4096
CALIBRATION_EXAMPLES = 256
CALIBRATION_BATCH = 32


def check_scheme(scheme: str, targets: Sequence[str] = ()) -> str:
    if scheme not in SCHEMES:
        raise ExportError(f"quantize={scheme!r} is not one of {SCHEMES}")
    others = [t for t in targets if t != "onnx"]
    if scheme == STATIC and others:
        raise ExportError(
            f"quantize='int8' is ONNX Runtime's static quantization of weights and "
            f"activations, for the onnx target only; the {', '.join(others)} target(s) take "
            "'int8-weights' (weights stored int8, dequantized in the graph). Export them "
            "separately, or use --target onnx"
        )
    return scheme


def calibration_inputs(data: Any, input_key: str, sample: np.ndarray) -> np.ndarray:
    """The first `CALIBRATION_EXAMPLES` inputs of ``data`` (an array, or a dict holding
    ``input_key``), checked against the sample's shape and dtype."""
    if isinstance(data, Mapping):
        if input_key not in data:
            raise ExportError(
                f"the calibration data has no {input_key!r} (it has {sorted(data)}): static "
                "int8 needs the model's inputs (jaxmint export uses the run's training data)"
            )
        data = data[input_key]
    if data is None:
        raise ExportError(
            "quantize='int8' calibrates activation ranges on example inputs: give "
            "calibration_data (a few hundred training inputs; jaxmint export uses the run's "
            "own), or use 'int8-weights'"
        )
    x = np.asarray(data)[:CALIBRATION_EXAMPLES]
    if x.ndim != sample.ndim or x.shape[1:] != sample.shape[1:] or x.dtype != sample.dtype:
        raise ExportError(
            f"calibration inputs are {x.dtype}{list(x.shape)}; the model takes "
            f"{sample.dtype}{['batch', *sample.shape[1:]]}"
        )
    if not len(x):
        raise ExportError("the calibration data has no examples")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise ExportError("the calibration inputs hold NaN or infinity")
    return x


def _quantizable(w: np.ndarray) -> bool:
    return w.ndim >= 2 and w.dtype.kind == "f" and w.size >= 16


def quantize(
    predict: Callable, names: Sequence[str], weights: Sequence[np.ndarray], scheme: str
) -> tuple[Callable, list[str], list[np.ndarray], dict]:
    """``(predict_q, names_q, weights_q, report)``: the weights stored as ``scheme`` and a
    predict function that takes them and dequantizes in the graph."""
    if scheme == "none":
        return predict, list(names), list(weights), {"scheme": "none"}
    plan: list[tuple] = []  # per original weight: how to rebuild it from weights_q
    names_q: list[str] = []
    weights_q: list[np.ndarray] = []
    before = after = quantized = 0
    for name, w in zip(names, weights, strict=True):
        w = np.asarray(w)
        before += w.nbytes
        if not _quantizable(w):
            plan.append(("keep", len(weights_q)))
            names_q.append(name)
            weights_q.append(w)
            after += w.nbytes
            continue
        quantized += 1
        if scheme == "bf16":
            plan.append(("cast", len(weights_q), w.dtype))
            names_q.append(name)
            weights_q.append(w.astype(ml_dtypes.bfloat16))
        else:
            peak = np.max(np.abs(w), axis=tuple(range(w.ndim - 1)))
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            plan.append(("int8", len(weights_q), len(weights_q) + 1, w.dtype))
            names_q += [name, name + SCALE_SUFFIX]
            weights_q += [q, scale]
        after += sum(a.nbytes for a in weights_q[plan[-1][1] :])

    def predict_q(stored, inputs):
        full = []
        for entry in plan:
            if entry[0] == "keep":
                full.append(stored[entry[1]])
            elif entry[0] == "cast":
                full.append(stored[entry[1]].astype(entry[2]))
            else:
                q, scale = stored[entry[1]], stored[entry[2]]
                full.append((q.astype(jnp.float32) * scale).astype(entry[3]))
        return predict(full, inputs)

    report = {
        "scheme": scheme,
        "weights_quantized": quantized,
        "weights_kept": len(plan) - quantized,
        "weight_bytes": after,
        "float_weight_bytes": before,
    }
    return predict_q, names_q, weights_q, report


def task_metric(
    eval_data: Mapping[str, Any] | None, input_key: str, output_names: list[str]
) -> Callable[[Callable], float]:
    """``measure(run) -> {"accuracy": percent, "bits": cross-entropy}`` of ``run(x) ->
    {output: logits}`` on the eval data: the argmax of the (first) output against
    integer labels ``y``, and the mean cross-entropy per label in bits (bits per
    byte for a byte-level language model).

    `ExportError` when the data cannot give one: a quantized export must be judged.
    """
    if eval_data is None or input_key not in eval_data or "y" not in eval_data:
        raise ExportError(
            f"a quantized export is judged by its accuracy on eval data: give eval_data with "
            f"{input_key!r} and integer labels 'y' (jaxmint export uses the experiment's eval "
            "data), or export without --quantize"
        )
    x = np.asarray(eval_data[input_key])[:MAX_EVAL_EXAMPLES]
    y = np.asarray(eval_data["y"])[:MAX_EVAL_EXAMPLES]
    if y.dtype.kind not in "iu" or len(x) != len(y) or not len(y):
        raise ExportError(
            f"the eval labels 'y' must be integers, one per example of {input_key!r}; got "
            f"{y.dtype}{list(y.shape)} for {len(x)} examples"
        )
    output = output_names[0]

    def measure(run: Callable[[np.ndarray], Mapping[str, np.ndarray]]) -> dict[str, float]:
        correct, nats = 0, 0.0
        for start in range(0, len(x), 256):
            logits = np.asarray(run(x[start : start + 256])[output]).astype(np.float64)
            labels = y[start : start + 256]
            if logits.shape[:-1] != labels.shape or labels.max() >= logits.shape[-1]:
                raise ExportError(
                    f"output {output!r} has shape {list(logits.shape)} for labels of shape "
                    f"{list(labels.shape)} up to {int(labels.max())}: accuracy needs logits "
                    "over the labels' classes"
                )
            correct += int(np.sum(np.argmax(logits, -1) == labels))
            peak = logits.max(-1, keepdims=True)
            log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
            picked = np.take_along_axis(logits, labels[..., None].astype(np.int64), -1)[..., 0]
            nats += float(np.sum(log_z - picked))
        return {"accuracy": 100.0 * correct / y.size, "bits": nats / y.size / np.log(2)}

    return measure


def jax_runner(predict: Callable, weights: Sequence[Any], input_key: str, single: bool, name):
    """``x -> {output: array}`` of ``predict`` under `jax.jit`, for the task metric."""
    jitted = jax.jit(predict)

    def run(x):
        out = jax.device_get(jitted(list(weights), {input_key: x}))
        return {name: out} if single else out

    return run


def quantize_onnx_static(
    folder: Path, calibration: np.ndarray, input_key: str
) -> tuple[list[str], dict]:
    """Replace ``folder/model.onnx`` (float) by ONNX Runtime's static int8 quantization
    of it, calibrated on ``calibration``; the files written, and the report for the
    manifest."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches = [
        {input_key: calibration[i : i + CALIBRATION_BATCH]}
        for i in range(0, len(calibration), CALIBRATION_BATCH)
    ]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    path = folder / "model.onnx"
    staged = folder.parent / ".int8.onnx"
    quiet = logging.getLogger()  # the tools log advice at WARNING on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(path),
            str(staged),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,  # per tensor: as accurate on our models, faster on x86
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        quiet.setLevel(level)
    model = onnx.load(str(staged))
    staged.unlink()
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    files = save_onnx(model, folder)
    return files, {
        "method": "onnxruntime static QDQ: int8 weights and activations, per tensor",
        "calibration": {
            "source": "given",
            "examples": len(calibration),
            "method": "minmax",
            "sha256": hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest(),
        },
        "weight_bytes": weight_bytes,
        "versions": {"onnxruntime": onnxruntime.__version__},
    }
