"""jaxmint: train pure-function JAX models flexibly, ship them as lean AOT artifacts."""

from jaxmint import data as data
from jaxmint import debug as debug
from jaxmint import experiment as experiment
from jaxmint import losses as losses
from jaxmint import metrics as metrics
from jaxmint import models as models
from jaxmint.models import Model as Model
from jaxmint.train import FitConfig as FitConfig
from jaxmint.train import FitResult as FitResult
from jaxmint.train import Hook as Hook
from jaxmint.train import TrainState as TrainState
from jaxmint.train import fit as fit

__version__ = "0.1.0"

__all__ = [
    "FitConfig",
    "FitResult",
    "Hook",
    "Model",
    "TrainState",
    "__version__",
    "data",
    "debug",
    "experiment",
    "fit",
    "losses",
    "metrics",
    "models",
]
