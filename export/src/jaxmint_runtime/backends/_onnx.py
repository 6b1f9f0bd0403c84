"""The ONNX backend: ``onnx/model.onnx`` run by ONNX Runtime (``jaxmint-runtime[onnx]``).

``load(..., onnx_providers=[...])``, else ``$JAXMINT_ONNX_PROVIDERS``
(comma-separated), else ``CPUExecutionProvider`` chooses ONNX Runtime's execution
providers, e.g. ``CUDAExecutionProvider,CPUExecutionProvider`` with
``onnxruntime-gpu``.
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
