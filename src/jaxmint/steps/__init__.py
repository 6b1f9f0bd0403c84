"""The pure functions of a run: init, train and eval steps, and the diagnostic step.

They depend only on the model, the loss and the optimizer; `jaxmint.fit` jits them
and drives them from a loop, and tools (lr-find, NaN replay) reuse them as they are.
"""

from jaxmint.steps._diagnostics import activation_stats as activation_stats
from jaxmint.steps._diagnostics import build_diagnose_step as build_diagnose_step
from jaxmint.steps._train import Steps as Steps
from jaxmint.steps._train import build_steps as build_steps

__all__ = ["Steps", "activation_stats", "build_diagnose_step", "build_steps"]
