"""The ONNX backend: ``onnx/model.onnx`` run by ONNX Runtime (``jaxmint-runtime[onnx]``).

``load(..., onnx_providers=[...])``, else ``$JAXMINT_ONNX_PROVIDERS``
(comma-separated), else ``CPUExecutionProvider`` chooses ONNX Runtime's execution
providers, e.g. ``CUDAExecutionProvider,CPUExecutionProvider`` with
``onnxruntime-gpu``.

Threads: ONNX Runtime's default intra-op pool has one thread per core, and those
threads spin (busy-wait) between ops, so a server answering one small request at
a time keeps every core busy. Here the pool has ``$JAXMINT_ONNX_THREADS`` threads
(default: the cores this process may use, at most 4), one inter-op thread, and
no spinning: a thread that has nothing to do sleeps. ONNX Runtime splits an op
over the pool only when it is large enough to gain from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from jaxmint_runtime._format import ArtifactError


class OnnxBackend:
    name = "onnx"
    fixed: frozenset[int] = frozenset()
    any_size = True  # the batch dimension is symbolic in the graph
    specialized = False  # and a new size costs no compile

    def __init__(self, directory: Path, manifest: dict, inputs, outputs, providers: list[str]):
        target = manifest["targets"]["onnx"]
        path = directory / target["file"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        options.intra_op_num_threads = threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({e})") from None
        have = {i.name for i in self.session.get_inputs()}
        want = {s.name for s in inputs}
        if have != want:
            raise ArtifactError(f"{path}: graph inputs {sorted(have)} do not match {sorted(want)}")
        produced = {o.name for o in self.session.get_outputs()}
        missing = [s.name for s in outputs if s.name not in produced]
        if missing:
            raise ArtifactError(
                f"{path}: the graph has no outputs {missing} (it has {sorted(produced)})"
            )
        self.output_names = [s.name for s in outputs]
        self.input_name = inputs[0].name if len(inputs) == 1 else None
        self._run = self.session.run
        self._first = self.output_names[:1]

    def call(self, key: int | None, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run(self.output_names, arrays)

    def call1(self, key: int | None, x: np.ndarray) -> np.ndarray:
        return self._run(self._first, {self.input_name: x})[0]

    def warm(self, key: int | None, arrays: dict[str, np.ndarray]) -> str:
        self.call(key, arrays)
        return "ready"

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "onnxruntime": ort.__version__,
            "providers": self.session.get_providers(),
        }


def threads() -> int:
    """ONNX Runtime's intra-op threads: ``$JAXMINT_ONNX_THREADS``, else the usable cores
    (at most 4)."""
    text = os.environ.get("JAXMINT_ONNX_THREADS", "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ArtifactError(f"$JAXMINT_ONNX_THREADS must be a positive integer, got {text!r}")
        return int(text)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, usable or 1))


def open(
    directory: Path, manifest: dict, inputs, outputs, *, onnx_providers=None, **_options
) -> OnnxBackend:
    source = "onnx_providers"
    if onnx_providers is None:
        source, env = "$JAXMINT_ONNX_PROVIDERS", os.environ.get("JAXMINT_ONNX_PROVIDERS", "")
        onnx_providers = [p.strip() for p in env.split(",") if p.strip()]
    wanted = list(onnx_providers) or ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise ArtifactError(
            f"{source} asks for {missing}, which this onnxruntime lacks (it has {available})"
        )
    return OnnxBackend(directory, manifest, inputs, outputs, wanted)
