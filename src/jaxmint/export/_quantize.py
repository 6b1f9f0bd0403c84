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
the runtime take them unchanged; the lowered function dequantizes. Every target
is then held to the task metric (`task_metric`): the accuracy of its argmax on
the run's eval data against the float model's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxmint.export._lower import ExportError

SCHEMES = ("none", "bf16", "int8-weights")
SCALE_SUFFIX = ":scale"
MAX_EVAL_EXAMPLES = 4096


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ExportError(f"quantize={scheme!r} is not one of {SCHEMES}")
    return scheme


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
    """``measure(run) -> accuracy in percent`` of ``run(x) -> {output: logits}`` on the
    eval data: the argmax of the (first) output against integer labels ``y``.

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

    def measure(run: Callable[[np.ndarray], Mapping[str, np.ndarray]]) -> float:
        correct = 0
        for start in range(0, len(x), 256):
            logits = np.asarray(run(x[start : start + 256])[output])
            labels = y[start : start + 256]
            if logits.shape[:-1] != labels.shape:
                raise ExportError(
                    f"output {output!r} has shape {list(logits.shape)} for labels of shape "
                    f"{list(labels.shape)}: accuracy needs logits over the labels' classes"
                )
            correct += int(np.sum(np.argmax(logits.astype(np.float32), -1) == labels))
        return 100.0 * correct / y.size

    return measure


def jax_runner(predict: Callable, weights: Sequence[Any], input_key: str, single: bool, name):
    """``x -> {output: array}`` of ``predict`` under `jax.jit`, for the task metric."""
    jitted = jax.jit(predict)

    def run(x):
        out = jax.device_get(jitted(list(weights), {input_key: x}))
        return {name: out} if single else out

    return run
