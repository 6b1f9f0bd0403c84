"""A report on an artifact: signature, files, versions, expiry and XLA's cost analysis."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from jaxmint_runtime._format import read_manifest, verify_files


def inspect_artifact(path: str | os.PathLike, *, analyze: bool = True) -> dict:
    """Describe an artifact; with ``analyze``, compile each declared batch size on this
    platform and add FLOPs, bytes accessed and peak memory from XLA's analyses."""
    directory = Path(path)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    expires = dt.date.fromisoformat(manifest["expires"])
    report = {
        "name": manifest["name"],
        "format_version": manifest["format_version"],
        "inputs": manifest["inputs"],
        "outputs": manifest["outputs"],
        "batch_sizes": manifest["batch_sizes"],
        "symbolic_batch": any(m["batch_size"] is None for m in manifest["modules"]),
        "platforms": manifest["platforms"],
        "versions": manifest["versions"],
        "created": manifest["created"],
        "expires": manifest["expires"],
        "days_left": (expires - dt.date.today()).days,
        "experiment": manifest.get("experiment", {}),
        "precompiled": [
            {k: e[k] for k in ("platform", "device_kind", "jaxlib")}
            for e in manifest.get("precompiled", [])
        ],
        "parity": manifest.get("parity", {}),
        "files": {k: v["bytes"] for k, v in manifest["files"].items()},
    }
    if analyze:
        from jaxmint_runtime._predictor import load

        predictor = load(directory, warmup=False, allow_expired=True)
        report["analysis"] = {b: predictor.analyze(b) for b in predictor.batch_sizes or [1]}
    return report
