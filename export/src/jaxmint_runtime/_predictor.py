"""`load` an artifact and call it: validated numpy in, numpy out."""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export as jax_export

from jaxmint_runtime import _cache
from jaxmint_runtime._format import (
    WEIGHTS,
    ArtifactError,
    read_manifest,
    read_safetensors,
    verify_files,
)

log = logging.getLogger("jaxmint_runtime")


class InputError(ValueError):
    """Inputs do not match the artifact's signature; the message names the input."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, dtype and shape (``"batch"`` for a symbolic dim)."""

    name: str
    dtype: str
    shape: tuple

    @classmethod
    def from_json(cls, d: Mapping) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Predictor:
    """A loaded artifact. Call it with a dict of arrays (or one array); get numpy back.

    Batches whose size was declared at export run the precompiled executable (or
    one compiled at load); a smaller undeclared size is padded up to the next
    declared size and sliced back (no compile); a larger one is split into
    chunks of the largest fixed size, or, for a symbolic module, compiled once
    for that size and cached for the life of the process.
    """

    def __init__(self, directory: Path, manifest: dict, *, check_finite: bool = False):
        self.directory = directory
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
        self.single_output: bool = manifest.get("single_output", len(self.outputs) == 1)
        self.batch_sizes: list[int] = sorted(manifest.get("batch_sizes") or [])
        self.check_finite = check_finite
        weights = read_safetensors(directory / WEIGHTS)
        order = manifest["weights"]["order"]
        missing = [n for n in order if n not in weights]
        if missing:
            raise ArtifactError(f"{directory / WEIGHTS}: weights {missing[:3]} are missing")
        self._weights = [jax.device_put(np.asarray(weights[n])) for n in order]
        self._modules: dict[int | None, Any] = {}
        for m in manifest["modules"]:
            data = (directory / m["file"]).read_bytes()
            try:
                exported = jax_export.deserialize(bytearray(data))
            except Exception as e:
                raise ArtifactError(f"{directory / m['file']}: cannot deserialize ({e})") from None
            self._modules[m["batch_size"]] = jax.jit(exported.call)
        self.symbolic = None in self._modules
        self.executables: dict[int, str] = {}  # filled by warmup()
        self._fast: dict[tuple, Any] = {}  # (shape, dtype) -> executable, validated once
        self.max_batch = max(self.batch_sizes, default=0)

    # -- signature and validation -------------------------------------------------
    @property
    def signature(self) -> dict:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "batch_sizes": self.batch_sizes,
            "symbolic_batch": self.symbolic,
        }

    def validate(
        self, inputs: Any, *, check_finite: bool | None = None
    ) -> tuple[dict[str, np.ndarray], int]:
        """Check names, dtypes and shapes; return ``(arrays by name, batch size)``.

        ``check_finite`` (default: the predictor's setting) also refuses NaN and infinity
        in floating inputs.
        """
        check_finite = self.check_finite if check_finite is None else check_finite
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                names = [s.name for s in self.inputs]
                raise InputError(f"this model takes several inputs {names}: pass a dict")
            inputs = {self.inputs[0].name: inputs}
        expected = {s.name for s in self.inputs}
        if set(inputs) != expected:
            raise InputError(
                f"inputs {sorted(inputs)} do not match the model's {sorted(expected)}: missing "
                f"{sorted(expected - set(inputs))}, unexpected {sorted(set(inputs) - expected)}"
            )
        arrays, sizes = {}, {}
        for spec in self.inputs:
            value = inputs[spec.name]
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
            want = _np_dtype(spec.dtype)
            if arr.dtype != want:
                raise InputError(
                    f"input {spec.name!r} has dtype {arr.dtype}, expected {spec.dtype}"
                )
            if arr.ndim != len(spec.shape):
                raise InputError(
                    f"input {spec.name!r} has shape {arr.shape}, expected {_show(spec.shape)}"
                )
            for got, dim in zip(arr.shape, spec.shape, strict=True):
                if isinstance(dim, str):
                    sizes.setdefault(dim, got)
                    if sizes[dim] != got:
                        raise InputError(
                            f"input {spec.name!r} has {dim}={got} but another input has "
                            f"{dim}={sizes[dim]}"
                        )
                elif got != dim:
                    raise InputError(
                        f"input {spec.name!r} has shape {arr.shape}, expected {_show(spec.shape)}"
                    )
            if check_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InputError(f"input {spec.name!r} contains NaN or infinity")
            arrays[spec.name] = arr
        batch = sizes.get("batch")
        if batch is None or batch < 1:
            raise InputError(f"inputs need a batch of at least one example, got {batch}")
        return arrays, batch

    # -- calling ------------------------------------------------------------------
    def run(self, inputs: Any) -> dict[str, np.ndarray]:
        """Validate and predict; always returns ``{output name: array}``."""
        arrays, n = self.validate(inputs)
        return self._run_validated(arrays, n)

    def __call__(self, inputs: Any):
        """Predict; returns one array for a one-output model, else a dict by output name."""
        fast = self._fast_path(inputs)
        if fast is not None:
            return fast
        out = self.run(inputs)
        return next(iter(out.values())) if self.single_output else out

    def _fast_path(self, x):
        """One input array of a shape seen before, with its own executable: the dtype and
        shape checks are cached per shape, so only the value-dependent finite check (if
        on) runs again."""
        if type(x) is not np.ndarray or not self.single_output or len(self.inputs) != 1:
            return None
        fn = self._fast.get((x.shape, x.dtype))
        if fn is None:
            return None
        if self.check_finite and x.dtype.kind == "f" and not np.isfinite(x).all():
            raise InputError(f"input {self.inputs[0].name!r} contains NaN or infinity")
        return np.asarray(fn(self._weights, {self.inputs[0].name: x}))

    def _run_validated(self, arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        target = next((b for b in self.batch_sizes if b >= n), None)
        if target is not None and (target != n or not self.symbolic):
            return _slice(self._call(target, _pad(arrays, target)), n)
        if self.symbolic:
            if len(arrays) == 1 and self.single_output and (target == n or n > self.max_batch):
                (x,) = arrays.values()
                self._fast[(x.shape, x.dtype)] = self._modules[None]
            return self._call(None, arrays)
        # Fixed modules only and the batch is larger than any of them: chunk it.
        size = self.batch_sizes[-1]
        parts = [
            self._run_validated(_take(arrays, i, min(i + size, n)), min(size, n - i))
            for i in range(0, n, size)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _call(self, batch_size: int | None, arrays: dict[str, np.ndarray]) -> dict:
        fn = self._modules[batch_size] if batch_size in self._modules else self._modules[None]
        out = fn(self._weights, arrays)
        if self.single_output:
            return {self.outputs[0].name: np.asarray(out)}
        return {k: np.asarray(v) for k, v in out.items()}

    def warmup(self) -> dict[int, str]:
        """Run each declared batch size once; return how each executable was obtained:
        ``"precompiled"`` (from the artifact) or ``"compiled"`` (here, from the module)."""
        for b in self.batch_sizes:
            if b in self.executables:
                continue
            before = _cache.cache_events().get("cache_hits", 0)
            self._call(b, _zeros(self.inputs, b))
            hits = _cache.cache_events().get("cache_hits", 0) - before
            self.executables[b] = "precompiled" if hits else "compiled"
        return dict(self.executables)

    def analyze(self, batch_size: int) -> dict:
        """XLA's cost and memory analysis of the executable for ``batch_size``."""
        fn = self._modules.get(batch_size, self._modules.get(None))
        if fn is None:
            raise ValueError(f"no module for batch size {batch_size}; have {self.batch_sizes}")
        compiled = fn.lower(self._weights, _zeros(self.inputs, batch_size)).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else (cost or {})
        memory = compiled.memory_analysis()
        report = {
            "flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        }
        if memory is not None:
            report["peak_memory_bytes"] = int(
                getattr(memory, "temp_size_in_bytes", 0)
                + getattr(memory, "argument_size_in_bytes", 0)
                + getattr(memory, "output_size_in_bytes", 0)
            )
        return report


def _show(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _pad(arrays: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    out = {}
    for k, a in arrays.items():
        extra = size - a.shape[0]
        out[k] = a if extra == 0 else np.concatenate([a, np.repeat(a[-1:], extra, axis=0)])
    return out


def _slice(outputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in outputs.items()}


def _take(arrays, start, stop):
    return {k: a[start:stop] for k, a in arrays.items()}


def _zeros(specs: list[TensorSpec], batch: int) -> dict[str, np.ndarray]:
    return {
        s.name: np.zeros(
            tuple(batch if isinstance(d, str) else d for d in s.shape), _np_dtype(s.dtype)
        )
        for s in specs
    }


def load(
    path: str | os.PathLike,
    *,
    allow_expired: bool = False,
    precompiled: bool = True,
    warmup: bool = True,
    check_finite: bool = False,
    verify: bool = True,
) -> Predictor:
    """Load an artifact directory and return a `Predictor`.

    Every file's sha256 is checked against the manifest (``verify``), unknown
    files and newer format versions are refused, and so is a module past its
    ``jax.export`` compatibility date unless ``allow_expired``. Precompiled
    executables matching this platform and jaxlib are used; otherwise the
    portable module is compiled (logged). With ``check_finite`` a call refuses
    NaN and infinity in floating inputs (a numpy pass over the input; the
    server always checks).

    Example::

        predictor = jaxmint_runtime.load("artifacts/digits_mlp")
        logits = predictor(np.zeros((4, 64), np.float32))
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    expires = dt.date.fromisoformat(manifest["expires"])
    if dt.date.today() > expires and not allow_expired:
        raise ArtifactError(
            f"{directory}: exported with jax {manifest['versions']['jax']} on "
            f"{manifest['created'][:10]}; its jax.export compatibility window ended on "
            f"{expires}. Re-export it, or pass allow_expired=True (--allow-expired) to try anyway."
        )
    if precompiled:
        _use_precompiled(directory, manifest)
    predictor = Predictor(directory, manifest, check_finite=check_finite)
    if warmup:
        how = predictor.warmup()
        if how:
            log.info("%s: batch sizes %s", predictor.name, how)
    return predictor


def _use_precompiled(directory: Path, manifest: dict) -> None:
    here = _cache.platform_key()
    entries = manifest.get("precompiled", [])
    matching = [e for e in entries if all(e.get(k) == v for k, v in here.items())]
    if not matching:
        if entries:
            have = [{k: e.get(k) for k in here} for e in entries]
            log.info("no precompiled executable for %s (artifact has %s): compiling", here, have)
        return
    cache_dir = _cache.configure()
    for entry in matching:
        _cache.install([directory / f for f in entry["files"]], cache_dir)
