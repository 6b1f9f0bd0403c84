"""Optional dependencies: imported when a feature needs them, named when missing."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str, *, hint: str = "") -> ModuleType:
    """``import module``, or `MissingExtra` saying ``pip install 'jaxmint[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtra(
            f"{purpose} needs {top}, which is not installed: pip install 'jaxmint[{extra}]'"
            + (f" ({hint})" if hint else ""),
            name=top,
        ) from None


def pyplot() -> ModuleType:
    """matplotlib's pyplot drawing to files (no display), or `MissingExtra`."""
    matplotlib = require("matplotlib", "plots", "drawing plots", hint="or pass --no-plots")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
