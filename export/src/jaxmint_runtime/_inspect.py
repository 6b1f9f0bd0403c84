"""A report on an artifact: signature, targets, files, versions, expiry and cost analysis."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from jaxmint_runtime import backends
from jaxmint_runtime._format import read_manifest, verify_files


def inspect_artifact(path: str | os.PathLike, *, analyze: bool = True) -> dict:
    """Describe an artifact; with ``analyze`` and the XLA backend installed, compile each
    declared batch size on this platform and add FLOPs, bytes accessed and peak memory
    from XLA's analyses."""
    directory = Path(path)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    targets = manifest["targets"]
    report = {
        "name": manifest["name"],
        "format_version": manifest["format_version"],
        "inputs": manifest["inputs"],
        "outputs": manifest["outputs"],
        "batch_sizes": manifest["batch_sizes"],
        "versions": manifest["versions"],
        "created": manifest["created"],
        "experiment": manifest.get("experiment", {}),
        "targets": {name: _target(name, t) for name, t in targets.items()},
        "skipped_targets": manifest.get("skipped_targets", {}),
        "backends_installed": [b for b in backends.BACKENDS if backends.installed(b)],
        "files": {k: v["bytes"] for k, v in manifest["files"].items()},
        "quantization": manifest.get("quantization"),
    }
    if analyze and "xla" in targets and backends.installed("xla"):
        from jaxmint_runtime._predictor import load

        predictor = load(directory, backend="xla", warmup=False, allow_expired=True)
        report["analysis"] = {b: predictor.analyze(b) for b in predictor.batch_sizes or [1]}
    return report


def _target(name: str, target: dict) -> dict:
    out = {"parity": target.get("parity", {}), "versions": target.get("versions", {})}
    if name == "xla":
        expires = dt.date.fromisoformat(target["expires"])
        out |= {
            "symbolic_batch": any(m["batch_size"] is None for m in target["modules"]),
            "platforms": target["platforms"],
            "expires": target["expires"],
            "days_left": (expires - dt.date.today()).days,
            "precompiled": [
                {k: e[k] for k in ("platform", "device_kind", "jaxlib")}
                for e in target.get("precompiled", [])
            ],
        }
    elif name == "onnx":
        out |= {"file": target["file"], "opset": target["opset"]}
    elif name == "iree":
        out |= {
            "modules": [
                {"batch_size": m["batch_size"], "hal_target": m["hal_target"]}
                for m in target["modules"]
            ],
            "cpu": target.get("cpu"),
        }
    return out
