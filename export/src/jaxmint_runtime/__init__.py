"""jaxmint-runtime: load and serve jaxmint artifacts with no training code installed.

The core needs only numpy; the engines are extras: ``jaxmint-runtime[xla]`` (jax),
``[onnx]`` (ONNX Runtime), ``[iree]`` (IREE's runtime). See `jaxmint_runtime.backends`.
"""

from jaxmint_runtime._format import FORMAT_VERSION as FORMAT_VERSION
from jaxmint_runtime._format import ArtifactError as ArtifactError
from jaxmint_runtime._inspect import inspect_artifact as inspect_artifact
from jaxmint_runtime._predictor import InputError as InputError
from jaxmint_runtime._predictor import Predictor as Predictor
from jaxmint_runtime._predictor import TensorSpec as TensorSpec
from jaxmint_runtime._predictor import load as load
from jaxmint_runtime.backends import AUTO_ORDER as AUTO_ORDER
from jaxmint_runtime.backends import BackendUnavailable as BackendUnavailable

__version__ = "0.1.0"

__all__ = [
    "AUTO_ORDER",
    "FORMAT_VERSION",
    "ArtifactError",
    "BackendUnavailable",
    "InputError",
    "Predictor",
    "TensorSpec",
    "inspect_artifact",
    "load",
]
