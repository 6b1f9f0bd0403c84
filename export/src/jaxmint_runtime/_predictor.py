"""`load` an artifact and call it: validated numpy in, numpy out."""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxmint_runtime import backends
from jaxmint_runtime._format import (
    MANIFEST,
    ArtifactError,
    np_dtype,
    output_mismatch,
    read_labels,
    read_manifest,
    read_safetensors,
    verify_files,
)

log = logging.getLogger("jaxmint_runtime")


class InputError(ValueError):
    """Inputs do not match the artifact's signature; the message names the input."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, dtype and shape (``"batch"`` for a symbolic dim),
    and for an integer input the ``[low, high)`` range its values must lie in (token
    ids of a vocabulary), when the model declared one."""

    name: str
    dtype: str
    shape: tuple
    range: tuple[int, int] | None = None

    @classmethod
    def from_json(cls, d: Mapping) -> TensorSpec:
        bounds = d.get("range")
        return cls(d["name"], d["dtype"], tuple(d["shape"]), tuple(bounds) if bounds else None)

    def to_json(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.range is not None:
            out["range"] = list(self.range)
        return out

    def check_range(self, arr: np.ndarray) -> None:
        """`InputError` if an integer input holds a value outside ``range``."""
        if self.range is None:  # most inputs: no call on the request path
            return
        found = outside_range(arr, self.range)
        if found is not None:
            lo, hi, first = found
            low, high = self.range
            raise InputError(
                f"input {self.name!r} holds values outside [{low}, {high}) (min {lo}, max {hi}; "
                f"the first at index {first}): the model's inputs are ids below {high}, such "
                "as the tokens of its vocabulary"
            )


def outside_range(arr, bounds) -> tuple[int, int, tuple[int, ...]] | None:
    """``(min, max, index of the first bad value)`` when integer ``arr`` holds a value
    outside ``bounds = (low, high)`` (half-open), else None (also for other dtypes)."""
    arr = np.asarray(arr)
    if bounds is None or arr.dtype.kind not in "iu" or arr.size == 0:
        return None
    low, high = bounds
    lo, hi = int(arr.min()), int(arr.max())
    if low <= lo and hi < high:
        return None
    first = np.argwhere((arr < low) | (arr >= high))[0]
    return lo, hi, tuple(int(i) for i in first)


class Predictor:
    """A loaded artifact. Call it with a dict of arrays (or one array); get numpy back.

    The arrays are validated here, in numpy, whatever the backend. Then a batch
    size with its own executable runs it; with the XLA backend's symbolic module
    a smaller undeclared size is padded up to the next declared size and sliced
    back (no compile) and a larger one is compiled once and cached; ONNX Runtime
    takes any size as it is; with fixed-size executables only (IREE, or XLA
    exported with ``--fixed-batch``) a larger batch is split into chunks of the
    largest size.
    """

    def __init__(self, directory: Path, manifest: dict, backend, *, check_finite: bool = False):
        self.directory = directory
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
        self.single_output: bool = manifest.get("single_output", len(self.outputs) == 1)
        self.batch_sizes: list[int] = sorted(manifest.get("batch_sizes") or [])
        self.check_finite = check_finite
        self.backend = backend
        self.buckets: list[int] | None = None  # see `bucketed`
        self.labels: dict[str, list[str]] = {}  # output name -> class labels (labels.txt)
        self.executables: dict[int, str] = {}  # filled by warmup()
        self._fast: dict[tuple, Any] = {}  # (shape, dtype) -> module key, validated once

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def symbolic(self) -> bool:
        """Whether any batch size runs without padding or chunking."""
        return self.backend.any_size

    # -- signature and validation -------------------------------------------------
    @property
    def signature(self) -> dict:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "batch_sizes": self.batch_sizes,
            "symbolic_batch": self.symbolic,
            "backend": self.backend.name,
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
            want = np_dtype(spec.dtype)
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
            spec.check_range(arr)
            arrays[spec.name] = arr
        batch = sizes.get("batch")
        if batch is None or batch < 1:
            raise InputError(f"inputs need a batch of at least one example, got {batch}")
        return arrays, batch

    # -- calling ------------------------------------------------------------------
    def self_check(self) -> bool:
        """Run the artifact's check sample (inputs and jax's outputs, saved at export)
        and compare; `ArtifactError` naming the output if they differ. False when the
        artifact has no sample (exported by an older jaxmint).

        The tolerance is loose (1e-2 relative for floating point): it catches a wrong
        graph or wrong weights, not the precision a device's matmuls trade away
        (TF32 on a GPU); export's parity check holds targets to the strict one."""
        check = self.manifest.get("check")
        if check is None:
            return False
        path = self.directory / check["file"]
        tensors = read_safetensors(path)
        inputs = {s.name: tensors.get(f"input/{s.name}") for s in self.inputs}
        outputs = {s.name: tensors.get(f"output/{s.name}") for s in self.outputs}
        missing = [k for k, v in {**inputs, **outputs}.items() if v is None]
        if missing:
            raise ArtifactError(f"{path}: the check sample lacks {sorted(missing)}")
        try:
            got = self.run(inputs)
        except (InputError, ValueError) as e:
            raise ArtifactError(f"{path}: the check sample does not run: {e}") from None
        for name, want in outputs.items():
            why = output_mismatch(got[name], np.asarray(want), floor=1e-2)
            if why is not None:
                raise ArtifactError(
                    f"{self.directory}: output {name!r} on the check sample saved at export "
                    f"differs from jax's answer with the {self.backend_name} backend: {why}"
                )
        return True

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
        """One input array of a shape seen before that needs no padding: the dtype and
        shape checks are cached per shape, so only the value-dependent finite check (if
        on) runs again."""
        if type(x) is not np.ndarray or not self.single_output or len(self.inputs) != 1:
            return None
        key = self._fast.get((x.shape, x.dtype), _MISSING)
        if key is _MISSING:
            return None
        if self.check_finite and x.dtype.kind == "f" and not np.isfinite(x).all():
            raise InputError(f"input {self.inputs[0].name!r} contains NaN or infinity")
        self.inputs[0].check_range(x)
        return self.backend.call1(key, x)

    def bucketed(self, max_batch: int) -> Predictor:
        """This predictor (sharing its loaded backend) with a bounded set of batch sizes.

        A backend that compiles per batch size (XLA) runs every batch at a *bucket*:
        the declared sizes and the powers of two up to ``max_batch``, and
        ``max_batch`` itself. A batch is padded up to the next bucket and a larger one
        split into chunks of ``max_batch``, so a server compiles at most that many
        executables, all of them at `warmup`, none on the request path.
        """
        view = copy.copy(self)
        view._fast, view.executables = {}, {}
        powers = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch}
        declared = {s for s in self.batch_sizes if s <= max_batch}
        view.buckets = sorted(powers | declared | {max_batch})
        return view

    def _plan(self, n: int) -> tuple[str, int | None, int]:
        """How to run ``n`` examples: ``(how, module key, size it runs at)``, with how
        one of ``direct`` (run n as is), ``pad`` (pad to the size) or ``chunk``."""
        b = self.backend
        if self.buckets is not None and b.any_size and b.specialized and n not in b.fixed:
            target = next((s for s in self.buckets if s >= n), None)
            if target is None:
                return "chunk", None, self.buckets[-1]
            return ("direct", None, n) if target == n else ("pad", None, target)
        if n in b.fixed:
            return "direct", n, n
        if b.any_size and (not b.specialized or n in self.batch_sizes):
            return "direct", None, n
        if b.any_size:  # pad to a declared size (no compile), else compile n once
            target = next((s for s in self.batch_sizes if s >= n), None)
            return ("pad", None, target) if target is not None else ("direct", None, n)
        target = next((s for s in sorted(b.fixed) if s >= n), None)
        if target is not None:
            return "pad", target, target
        return "chunk", None, max(b.fixed)

    def _run_validated(self, arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        how, key, size = self._plan(n)
        if how == "direct":
            if len(arrays) == 1 and self.single_output:
                (x,) = arrays.values()
                self._fast[(x.shape, x.dtype)] = key
            return self._call(key, arrays)
        if how == "pad":
            return _slice(self._call(key, _pad(arrays, size)), n)
        parts = [
            self._run_validated(_take(arrays, i, min(i + size, n)), min(size, n - i))
            for i in range(0, n, size)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _call(self, key: int | None, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.backend.call(key, arrays)
        return {spec.name: out for spec, out in zip(self.outputs, outs, strict=True)}

    def warmup(self) -> dict[int, str]:
        """Run each declared batch size once; return how each executable was obtained,
        e.g. ``"precompiled"`` (from the artifact) or ``"compiled"`` (here, at load)."""
        for b in self.buckets or self.batch_sizes:
            if b in self.executables:
                continue
            _, key, size = self._plan(b)
            self.executables[b] = self.backend.warm(key, _zeros(self.inputs, size))
        return dict(self.executables)

    def time_batch(self, n: int, repeats: int = 5, enough: float = float("inf")) -> float:
        """Seconds the fastest of ``repeats`` runs of ``n`` examples took: validation,
        padding and the backend, as `run` does. It stops at a run slower than
        ``enough`` seconds (a slow model is not run over and over to say it is slow)."""
        arrays = _zeros(self.inputs, n)
        for spec in self.inputs:  # zeros, or the lowest id a ranged input accepts
            if spec.range is not None:
                arrays[spec.name] += spec.range[0]
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.run(arrays)
            took = time.perf_counter() - start
            best = min(best, took)
            if took > enough:
                break
        return best

    def analyze(self, batch_size: int) -> dict:
        """The backend's cost and memory analysis of the executable for ``batch_size``
        (XLA's analyses with the XLA backend)."""
        analyze = getattr(self.backend, "analyze", None)
        if analyze is None:
            raise ValueError(f"the {self.backend.name} backend has no cost analysis; use xla")
        return analyze(batch_size, _zeros(self.inputs, batch_size))


_MISSING = object()


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
            tuple(batch if isinstance(d, str) else d for d in s.shape), np_dtype(s.dtype)
        )
        for s in specs
    }


def load(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    allow_expired: bool = False,
    precompiled: bool = True,
    warmup: bool = True,
    check_finite: bool = False,
    verify: bool = True,
    iree_driver: str | None = None,
    onnx_providers: list[str] | None = None,
) -> Predictor:
    """Load an artifact directory and return a `Predictor`.

    ``backend`` is ``"xla"``, ``"onnx"``, ``"iree"`` or ``"auto"``: the first of
    `jaxmint_runtime.backends.AUTO_ORDER` (xla, onnx, iree; ``$JAXMINT_BACKEND``
    overrides it) that the artifact has a target for and this environment has
    installed. Every file's sha256 is checked against the manifest (``verify``),
    unknown files and newer format versions are refused, and so is an XLA module
    past its ``jax.export`` compatibility date unless ``allow_expired``. With the
    XLA backend, precompiled executables matching this platform and jaxlib are
    used; otherwise the portable module is compiled (logged). With
    ``check_finite`` a call refuses NaN and infinity in floating inputs (a numpy
    pass over the input; the server always checks). ``iree_driver`` (``local-sync``,
    ``local-task``, ``vulkan``) and ``onnx_providers`` choose the engines' devices;
    by default ``$JAXMINT_IREE_DRIVER`` and ``$JAXMINT_ONNX_PROVIDERS``, else the CPU.

    Example::

        predictor = jaxmint_runtime.load("artifacts/digits_mlp")
        logits = predictor(np.zeros((4, 64), np.float32))
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    verify_files(directory, manifest, hashes=verify)  # confinement always; sha256 if verify
    name = backends.choose(list(manifest["targets"]), backend)
    target = manifest["targets"][name]
    if name == "xla":
        try:
            expires = dt.date.fromisoformat(target["expires"])
        except ValueError:
            raise ArtifactError(
                f"{directory / MANIFEST}: field 'targets/xla/expires' is not a date: "
                f"{target['expires'][:20]!r}"
            ) from None
        if dt.date.today() > expires and not allow_expired:
            raise ArtifactError(
                f"{directory}: exported with jax {target['versions']['jax']} on "
                f"{manifest['created'][:10]}; its jax.export compatibility window ended on "
                f"{expires}. Re-export it, pass allow_expired=True (--allow-expired) to try "
                "anyway, or use another of its targets."
            )
    inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
    outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
    options = {"iree_driver": iree_driver, "onnx_providers": onnx_providers}
    engine = backends.open_backend(name, directory, manifest, inputs, outputs, options)
    if precompiled and hasattr(engine, "use_precompiled"):
        engine.use_precompiled()
    predictor = Predictor(directory, manifest, engine, check_finite=check_finite)
    predictor.labels = read_labels(directory, manifest)
    if warmup:
        how = predictor.warmup()
        if how:
            log.info("%s (%s): batch sizes %s", predictor.name, name, how)
    return predictor
