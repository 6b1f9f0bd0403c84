"""Training: the train state, pure steps, and the `fit` loop."""

from jaxmint.train._distributed import initialize as initialize_distributed
from jaxmint.train._fit import FitResult as FitResult
from jaxmint.train._fit import NonFiniteError as NonFiniteError
from jaxmint.train._fit import fit as fit
from jaxmint.train._hooks import Hook as Hook
from jaxmint.train._state import TrainState as TrainState
from jaxmint.train._step import Steps as Steps
from jaxmint.train._step import build_steps as build_steps

__all__ = [
    "FitResult",
    "Hook",
    "NonFiniteError",
    "Steps",
    "TrainState",
    "build_steps",
    "fit",
    "initialize_distributed",
]
