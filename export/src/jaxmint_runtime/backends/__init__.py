"""Runtime backends: the engines that run an artifact's compiled targets.

Each export target has a backend of the same name, installed as an extra of
``jaxmint-runtime``; the core (loading, validation, padding, serving) needs only
numpy, so an ONNX or IREE deployment installs no jax at all.

========  ===========================================  ================================
backend   runs                                         install
========  ===========================================  ================================
``xla``   the ``jax.export`` modules, with JAX/XLA     ``pip install 'jaxmint-runtime[xla]'``
``onnx``  ``onnx/model.onnx`` with ONNX Runtime        ``pip install 'jaxmint-runtime[onnx]'``
``iree``  ``iree/*.vmfb`` with IREE's runtime          ``pip install 'jaxmint-runtime[iree]'``
========  ===========================================  ================================

``backend="auto"`` takes the first of `AUTO_ORDER` that the artifact has a target
for and whose runtime is installed; ``$JAXMINT_BACKEND`` (e.g. ``iree,onnx``)
replaces that order.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxmint_runtime._format import ArtifactError

BACKENDS = ("xla", "onnx", "iree")
# XLA first: it runs the reference modules (the others are checked against them at
# export), on every platform jax supports. Then ONNX Runtime, then IREE.
AUTO_ORDER = ("xla", "onnx", "iree")
_MODULES = {"xla": "jax", "onnx": "onnxruntime", "iree": "iree.runtime"}


class BackendUnavailable(ArtifactError):
    """The backend's runtime is not installed; the message names the pip command."""


class Backend(Protocol):
    """What `Predictor` needs from an engine.

    ``fixed`` holds the batch sizes that have their own executable; ``any_size`` says
    whether ``call(None, ...)`` takes any batch size; ``specialized`` whether each new
    size costs a compile (then smaller batches are padded to a declared size).
    """

    name: str
    fixed: frozenset[int]
    any_size: bool
    specialized: bool

    def call(self, key: int | None, arrays: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def call1(self, key: int | None, x: np.ndarray) -> np.ndarray: ...

    def warm(self, key: int | None, arrays: dict[str, np.ndarray]) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def installed(name: str) -> bool:
    """Whether the runtime library of backend ``name`` can be imported here."""
    module = _MODULES[name]
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None and (
            "." not in module or importlib.util.find_spec(module) is not None
        )
    except (ImportError, ValueError):
        return False


def install_hint(name: str) -> str:
    return f"pip install 'jaxmint-runtime[{name}]'"


def choose(available_targets: list[str], requested: str = "auto") -> str:
    """The backend to use for an artifact with ``available_targets``."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ArtifactError(f"unknown backend {requested!r}; choose from auto, {BACKENDS}")
        if requested not in available_targets:
            raise ArtifactError(
                f"the artifact has no {requested!r} target (it has {available_targets}); "
                f"re-export with --target {requested}"
            )
        if not installed(requested):
            raise BackendUnavailable(
                f"backend {requested!r} is not installed: {install_hint(requested)}"
            )
        return requested
    order = _auto_order()
    for name in order:
        if name in available_targets and installed(name):
            return name
    if order != AUTO_ORDER:
        raise BackendUnavailable(
            f"$JAXMINT_BACKEND={','.join(order)} allows none of this artifact's targets "
            f"{available_targets} that is installed here"
        )
    hints = "; ".join(f"{t}: {install_hint(t)}" for t in available_targets if t in BACKENDS)
    raise BackendUnavailable(
        f"no runtime is installed for any target of this artifact ({available_targets}); "
        f"install one ({hints})"
    )


def _auto_order() -> tuple[str, ...]:
    env = os.environ.get("JAXMINT_BACKEND", "").strip()
    if not env:
        return AUTO_ORDER
    names = tuple(n.strip() for n in env.split(",") if n.strip())
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise ArtifactError(
            f"$JAXMINT_BACKEND names unknown backends {bad}; choose from {BACKENDS}"
        )
    return names


def host_cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """This CPU's feature flags from /proc/cpuinfo, or None where that is unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def open_backend(
    name: str, directory, manifest: dict, inputs, outputs, options: dict | None = None
) -> Backend:
    """Import backend ``name`` and load the artifact's target into it.

    ``options`` are the engine settings of `jaxmint_runtime.load` (``iree_driver``,
    ``onnx_providers``); a backend takes the ones that concern it."""
    try:
        module = importlib.import_module(f"jaxmint_runtime.backends._{name}")
    except ImportError as e:
        raise BackendUnavailable(
            f"backend {name!r} cannot be imported ({e}): {install_hint(name)}"
        ) from None
    return module.open(directory, manifest, inputs, outputs, **(options or {}))
