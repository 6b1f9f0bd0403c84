"""Tracking: JSON-lines metrics, TensorBoard event files and the progress bar."""

from jaxmint.track._writers import JsonlWriter as JsonlWriter
from jaxmint.track._writers import ProgressBar as ProgressBar
from jaxmint.track._writers import TensorBoardWriter as TensorBoardWriter
from jaxmint.track._writers import read_metrics as read_metrics

__all__ = ["JsonlWriter", "ProgressBar", "TensorBoardWriter", "read_metrics"]
