"""Write an artifact directory: modules, weights, precompiled executables, manifest.

The directory is assembled next to its destination and moved into place only
after the parity check passed, so a failed export never leaves a half-written
artifact nor touches an existing one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from jaxmint.export._lower import ExportError, lower, output_specs, predict_function
from jaxmint_runtime import load as runtime_load
from jaxmint_runtime._format import (
    COMPAT_DAYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    sha256_file,
    write_safetensors,
)

log = logging.getLogger("jaxmint")

DEFAULT_BATCH_SIZES = (1, 8, 32)


def _tolerance(dtype) -> tuple[float, float]:
    name = str(dtype)
    if name in ("bfloat16",):
        return 2e-2, 2e-2
    if name in ("float16",):
        return 5e-3, 5e-3
    if np.issubdtype(np.dtype(name), np.floating):
        return 1e-4, 1e-5
    return 0.0, 0.0  # integers and booleans must match exactly


def config_hash(config: Mapping[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def export_model(
    model,
    variables: Mapping[str, Any],
    sample: np.ndarray,
    out: str | os.PathLike,
    *,
    name: str,
    input_key: str = "x",
    platforms: Sequence[str] = ("cpu",),
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    fixed_batch: bool = False,
    precompile: bool = True,
    force: bool = False,
    experiment: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model.apply(variables, x, train=False)`` to an artifact directory.

    Args:
      sample: a few real inputs ``(n, ...)``; they fix the non-batch shape and
        dtype and feed the parity check.
      platforms: lowering targets, e.g. ``("cpu", "cuda")``.
      batch_sizes: declared batch sizes: precompiled (on the exporting platform,
        when it is in ``platforms``) and the sizes smaller batches are padded to.
      fixed_batch: one module per declared size instead of one symbolic module.
      force: replace an existing artifact at ``out`` (only once the new one passed).
      experiment: recorded in the manifest (name, config hash, step).

    Example::

        path = export_model(model, variables, test["x"][:8], "artifacts/mlp", name="mlp")
    """
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} already exists and is not empty; pass --force to replace it")
    sample = np.asarray(sample)
    if sample.ndim < 1 or sample.shape[0] < 1:
        raise ExportError(f"the sample input needs a batch axis with examples, got {sample.shape}")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if any(b < 1 for b in batch_sizes) or (fixed_batch and not batch_sizes):
        raise ExportError(f"batch sizes must be positive integers, got {batch_sizes}")
    platforms = list(dict.fromkeys(platforms))

    predict, names, weights = predict_function(model, variables, input_key)
    weights = [np.asarray(jax.device_get(w)) for w in weights]
    if fixed_batch:
        modules = {
            b: lower(predict, weights, sample, input_key, platforms=platforms, batch_size=b)
            for b in batch_sizes
        }
    else:
        modules = {
            None: lower(predict, weights, sample, input_key, platforms=platforms, batch_size=None)
        }
    outputs, single = output_specs(next(iter(modules.values())))
    in_shape = ["batch", *sample.shape[1:]]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        module_entries = []
        for b, exported in modules.items():
            fname = "module.jaxexport" if b is None else f"module-b{b}.jaxexport"
            (tmp / fname).write_bytes(exported.serialize())
            module_entries.append({"file": fname, "batch_size": b})
        write_safetensors(tmp / WEIGHTS, dict(zip(names, weights, strict=True)))
        created = dt.datetime.now(dt.UTC)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": name,
            "created": created.isoformat(timespec="seconds"),
            "expires": (created.date() + dt.timedelta(days=COMPAT_DAYS)).isoformat(),
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
            "platforms": platforms,
            "inputs": [{"name": input_key, "dtype": str(sample.dtype), "shape": in_shape}],
            "outputs": outputs,
            "single_output": single,
            "batch_sizes": batch_sizes,
            "modules": module_entries,
            "weights": {"file": WEIGHTS, "order": names},
            "experiment": dict(experiment or {}),
            "precompiled": [],
            "parity": {},
        }
        _write_manifest(tmp, manifest)
        manifest["parity"] = _parity(tmp, predict, weights, sample, input_key, batch_sizes)
        here = jax.devices()[0].platform
        if precompile and batch_sizes and here in platforms:
            manifest["precompiled"] = [_precompile(tmp)]
        _write_manifest(tmp, manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_manifest(directory: Path, manifest: dict) -> None:
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = files
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _parity(directory, predict, weights, sample, input_key, batch_sizes) -> dict:
    """Run the artifact through the runtime's loader against the jitted original."""
    predictor = runtime_load(
        directory, precompiled=False, warmup=False, allow_expired=True, check_finite=False
    )
    reference = jax.jit(predict)
    sizes = sorted({1, sample.shape[0], *[b for b in batch_sizes if b <= sample.shape[0]]})
    if sample.shape[0] > 2:
        sizes.append(sample.shape[0] - 1)  # an undeclared size: exercises padding
    report = {}
    for n in sorted(set(sizes)):
        x = sample[:n]
        got = predictor.run({input_key: x})
        want = reference(weights, {input_key: x})
        if predictor.single_output:
            want = {predictor.outputs[0].name: want}
        for key, w in jax.device_get(want).items():
            w, g = np.asarray(w), got[key]
            rtol, atol = _tolerance(w.dtype)
            scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
            err = (
                float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
                if w.size
                else 0.0
            )
            if g.shape != w.shape or not np.allclose(g, w, rtol=rtol, atol=atol * scale):
                raise ExportError(
                    f"parity check failed for output {key!r} at batch size {n}: max abs "
                    f"difference {err:.3g} (tolerance rtol={rtol}, atol={atol * scale:.3g}); "
                    f"shapes {g.shape} vs {w.shape}. The artifact was not written."
                )
            report[key] = max(report.get(key, 0.0), err)
    return {"max_abs_error": report, "batch_sizes_checked": sorted(set(sizes))}


def _precompile(directory: Path) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="jaxmint-precompile-"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jaxmint_runtime.precompile", str(directory), str(cache)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise ExportError(f"precompiling failed:\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        platform = info["platform"]
        target = directory / "compiled" / platform
        target.mkdir(parents=True, exist_ok=True)
        files = []
        for entry in info.pop("entries"):
            shutil.copyfile(cache / entry, target / entry)
            files.append(f"compiled/{platform}/{entry}")
        return {**info, "files": files}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
