"""Diagnosis: gradient and activation statistics, pathology report, LR range test, NaN hunt."""

from jaxmint.diagnose._lrfind import LRFind as LRFind
from jaxmint.diagnose._lrfind import lr_find as lr_find
from jaxmint.diagnose._nan import localize_nonfinite as localize_nonfinite
from jaxmint.diagnose._report import Flag as Flag
from jaxmint.diagnose._report import Report as Report
from jaxmint.diagnose._report import describe as describe
from jaxmint.diagnose._report import diagnose_run as diagnose_run
from jaxmint.diagnose._report import find_flags as find_flags
from jaxmint.diagnose._report import plot_metrics as plot_metrics
from jaxmint.steps import activation_stats as activation_stats
from jaxmint.steps import build_diagnose_step as build_diagnose_step

__all__ = [
    "Flag",
    "LRFind",
    "Report",
    "activation_stats",
    "build_diagnose_step",
    "describe",
    "diagnose_run",
    "find_flags",
    "localize_nonfinite",
    "lr_find",
    "plot_metrics",
]
