"""The XLA backend: ``jax.export`` modules compiled by XLA (``jaxmint-runtime[xla]``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export as jax_export

from jaxmint_runtime import _cache
from jaxmint_runtime._format import ArtifactError, read_weights

log = logging.getLogger("jaxmint_runtime")


class XlaBackend:
    name = "xla"
    specialized = True  # each new batch size is a compile

    def __init__(self, directory: Path, manifest: dict, inputs, outputs):
        self.directory = directory
        self.target = manifest["targets"]["xla"]
        self.single_output = manifest.get("single_output", len(outputs) == 1)
        self.output_names = [s.name for s in outputs]
        self.input_name = inputs[0].name if len(inputs) == 1 else None
        self.manifest_files = manifest["files"]
        self._installed: list[Path] = []  # cache entries this artifact put in place
        self._weights = [jax.device_put(np.asarray(w)) for w in read_weights(directory, manifest)]
        self._modules: dict[int | None, Any] = {}
        for m in self.target["modules"]:
            data = (directory / m["file"]).read_bytes()
            try:
                exported = jax_export.deserialize(bytearray(data))
            except Exception as e:
                raise ArtifactError(f"{directory / m['file']}: cannot deserialize ({e})") from None
            self._modules[m["batch_size"]] = jax.jit(exported.call)
        self.fixed = frozenset(k for k in self._modules if k is not None)
        self.any_size = None in self._modules

    def _fn(self, key: int | None):
        return self._modules[key] if key in self._modules else self._modules[None]

    def call(self, key: int | None, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self._run(key, arrays)
        if self.single_output:
            return [np.asarray(out)]
        return [np.asarray(out[k]) for k in self.output_names]

    def call1(self, key: int | None, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(key, {self.input_name: x}))

    def _run(self, key: int | None, arrays: dict[str, np.ndarray]):
        try:
            return self._fn(key)(self._weights, arrays)
        except Exception as e:  # jaxlib raises its own types for an executable it cannot load
            if not self._installed:
                raise
            # A precompiled executable that does not run is never trusted again: set it
            # aside and compile the portable module instead.
            for entry, _ in self._installed:
                _cache.set_aside(entry, f"XLA could not load it: {str(e).splitlines()[0][:120]}")
            self._installed = []
            return self._fn(key)(self._weights, arrays)

    def use_precompiled(self) -> None:
        """Install the artifact's XLA cache entries that match this platform and jaxlib."""
        here = _cache.platform_key()
        entries = self.target.get("precompiled", [])
        matching = [e for e in entries if all(e.get(k) == v for k, v in here.items())]
        if not matching:
            if entries:
                have = [{k: e.get(k) for k in here} for e in entries]
                log.info(
                    "no precompiled executable for %s (artifact has %s): compiling", here, have
                )
            return
        cache_dir = _cache.configure()
        files = self.manifest_files
        for entry in matching:
            pairs = [(self.directory / f, files[f]["sha256"]) for f in entry["files"]]
            self._installed += _cache.install(pairs, cache_dir)

    def warm(self, key: int | None, arrays: dict[str, np.ndarray]) -> str:
        before = _cache.cache_events().get("cache_hits", 0)
        had_precompiled = bool(self._installed)
        self.call(key, arrays)
        if had_precompiled and not self._installed:
            return "compiled"  # its precompiled executable was set aside
        hits = _cache.cache_events().get("cache_hits", 0) - before
        if not hits:
            return "compiled"
        _cache.mark_loaded(self._installed)
        return "precompiled"

    def analyze(self, batch_size: int, arrays: dict[str, np.ndarray]) -> dict:
        """XLA's cost and memory analysis of the executable for ``batch_size``.

        XLA counts the body of a loop once, whatever its trip count, so for a program
        with loops (a model with scanned layers) the FLOPs and bytes are lower bounds:
        ``loops_counted_once`` says so.
        """
        compiled = self._fn(batch_size).lower(self._weights, arrays).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else (cost or {})
        memory = compiled.memory_analysis()
        report = {
            "flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
            "loops_counted_once": " while(" in compiled.as_text(),
        }
        if memory is not None:
            report["peak_memory_bytes"] = int(
                getattr(memory, "temp_size_in_bytes", 0)
                + getattr(memory, "argument_size_in_bytes", 0)
                + getattr(memory, "output_size_in_bytes", 0)
            )
        return report

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(jax.devices()[0].device_kind)}


def open(directory: Path, manifest: dict, inputs, outputs, **_options) -> XlaBackend:
    return XlaBackend(directory, manifest, inputs, outputs)
