"""Export: lower the experiment's predict function into an artifact (XLA, ONNX, IREE).

The artifact is a directory (format documented in docs/artifact-format.md) that
`jaxmint_runtime.load` runs without any training code.
"""

from jaxmint.export._artifact import DEFAULT_BATCH_SIZES as DEFAULT_BATCH_SIZES
from jaxmint.export._artifact import export_model as export_model
from jaxmint.export._lower import ExportError as ExportError
from jaxmint.export._run import export_run as export_run
from jaxmint.export._run import load_experiment as load_experiment
from jaxmint.export._targets import DEFAULT_ONNX_OPSET as DEFAULT_ONNX_OPSET
from jaxmint.export._targets import TARGETS as TARGETS

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_ONNX_OPSET",
    "TARGETS",
    "ExportError",
    "export_model",
    "export_run",
    "load_experiment",
]
