"""The IREE backend: ``.vmfb`` modules run by IREE's runtime (``jaxmint-runtime[iree]``).

IREE modules are compiled per declared batch size (static shapes), so smaller
batches are padded and larger ones chunked. ``load(..., iree_driver=NAME)``, else
``$JAXMINT_IREE_DRIVER``, chooses the HAL driver: ``local-sync`` (default: runs on
the calling thread; the lowest batch-1 latency in ``benchmarks/backends.py``),
``local-task`` (a thread pool, for big batches) or ``vulkan`` (the artifact's
``vulkan-spirv`` modules, whose parity is checked at export only where the
exporting machine has a Vulkan device).
"""

from __future__ import annotations

import os
from pathlib import Path

import iree.runtime as ireert
import numpy as np

from jaxmint_runtime._format import ArtifactError, read_weights
from jaxmint_runtime.backends import host_cpu_flags

DRIVERS = {"local-sync": "llvm-cpu", "local-task": "llvm-cpu", "vulkan": "vulkan-spirv"}


class IreeBackend:
    name = "iree"
    any_size = False
    specialized = True

    def __init__(self, directory: Path, manifest: dict, inputs, outputs, driver: str):
        target = manifest["targets"]["iree"]
        hal_target = DRIVERS[driver]
        modules = [m for m in target["modules"] if m["hal_target"] == hal_target]
        if not modules:
            have = sorted({m["hal_target"] for m in target["modules"]})
            raise ArtifactError(
                f"{directory}: no IREE module for driver {driver!r} ({hal_target}); the "
                f"artifact has {have}"
            )
        if hal_target == "llvm-cpu":
            check_cpu(target, directory)
        try:
            self.config = ireert.Config(driver)
        except Exception as e:
            raise ArtifactError(f"IREE driver {driver!r} is not usable here ({e})") from None
        self.driver = driver
        device = self.config.device
        self._weights = [
            ireert.asdevicearray(device, np.asarray(w)) for w in read_weights(directory, manifest)
        ]
        self.input_order = sorted(s.name for s in inputs)
        self.n_outputs = len(outputs)
        self._fns = {}
        for m in modules:
            path = directory / m["file"]
            context = ireert.SystemContext(config=self.config)
            try:
                vm_module = ireert.VmModule.mmap(context.instance, str(path))
            except Exception as e:
                raise ArtifactError(f"{path}: IREE cannot load it ({e})") from None
            context.add_vm_module(vm_module)
            self._fns[m["batch_size"]] = context.modules[vm_module.name]["main"]
        self.fixed = frozenset(self._fns)

    def call(self, key: int | None, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self._fns[key](*self._weights, *[arrays[k] for k in self.input_order])
        outs = out if isinstance(out, tuple | list) else (out,)
        # Copies: a view of IREE's mapped result buffer outlives the buffer otherwise.
        return [np.array(o.to_host()) for o in outs]

    def call1(self, key: int | None, x: np.ndarray) -> np.ndarray:
        return np.array(self._fns[key](*self._weights, x).to_host())

    def warm(self, key: int | None, arrays: dict[str, np.ndarray]) -> str:
        self.call(key, arrays)
        return "ready"

    def describe(self) -> dict:
        return {"backend": self.name, "driver": self.driver}


def check_cpu(target: dict, directory: Path, flags: set[str] | None = None) -> None:
    """Refuse llvm-cpu modules built for CPU features this machine lacks: running them
    would crash the process with an illegal instruction."""
    needed = target.get("cpu_flags") or []
    flags = host_cpu_flags() if flags is None else flags
    if flags is None or not needed:
        return
    missing = sorted(set(needed) - flags)
    if missing:
        raise ArtifactError(
            f"{directory}: its IREE modules were compiled for CPU {target.get('cpu')!r}, which "
            f"needs {missing}; this CPU lacks them. Re-export with --iree-cpu generic, or use "
            "another target."
        )


def open(
    directory: Path, manifest: dict, inputs, outputs, *, iree_driver=None, **_options
) -> IreeBackend:
    source = "iree_driver"
    if iree_driver is None:
        source, iree_driver = "$JAXMINT_IREE_DRIVER", os.environ.get("JAXMINT_IREE_DRIVER", "")
    driver = iree_driver.strip() or "local-sync"
    if driver not in DRIVERS:
        raise ArtifactError(f"{source}={driver!r}: choose from {sorted(DRIVERS)}")
    return IreeBackend(directory, manifest, inputs, outputs, driver)
