"""jaxmint-runtime: load and serve jaxmint artifacts with no training code installed."""

from jaxmint_runtime._format import FORMAT_VERSION as FORMAT_VERSION
from jaxmint_runtime._format import ArtifactError as ArtifactError
from jaxmint_runtime._inspect import inspect_artifact as inspect_artifact
from jaxmint_runtime._predictor import InputError as InputError
from jaxmint_runtime._predictor import Predictor as Predictor
from jaxmint_runtime._predictor import TensorSpec as TensorSpec
from jaxmint_runtime._predictor import load as load

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "InputError",
    "Predictor",
    "TensorSpec",
    "inspect_artifact",
    "load",
]
