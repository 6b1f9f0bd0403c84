"""Debugging: debug mode, checked steps, and one train step taken apart.

- ``fit(..., debug=True)`` / ``--debug``: un-jitted steps with concrete arrays;
- ``fit(..., check=True)`` / ``--check``: checkified steps, stopping at the first
  NaN or out-of-bounds index with the step and the location (`CheckError`);
- `inspect_step` / ``jaxmint inspect-step RUN_DIR``: one step's outputs,
  intermediates, loss terms, per-term gradient norms and optimizer update.
"""

from jaxmint.debug._inspect import StepInspection as StepInspection
from jaxmint.debug._inspect import inspect_run as inspect_run
from jaxmint.debug._inspect import inspect_step as inspect_step
from jaxmint.debug._inspect import rerun_command as rerun_command
from jaxmint.run import DEBUG_MARKER as MARKER
from jaxmint.run import DebugRunError as DebugRunError
from jaxmint.train import CheckError as CheckError
from jaxmint.train import is_concrete as is_concrete

__all__ = [
    "MARKER",
    "CheckError",
    "DebugRunError",
    "StepInspection",
    "inspect_run",
    "inspect_step",
    "is_concrete",
    "rerun_command",
]
