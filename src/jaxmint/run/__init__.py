"""The run directory: `RunDir` is the only code that knows its files."""

from jaxmint.run._rundir import DEBUG_MARKER as DEBUG_MARKER
from jaxmint.run._rundir import DebugRunError as DebugRunError
from jaxmint.run._rundir import RunDir as RunDir
from jaxmint.run._rundir import RunDirError as RunDirError
from jaxmint.run._rundir import load_params as load_params
from jaxmint.run._script import load_module as load_module

__all__ = ["DEBUG_MARKER", "DebugRunError", "RunDir", "RunDirError", "load_module", "load_params"]
