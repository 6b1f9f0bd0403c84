"""The artifact format: manifest fields, file hashes and the weights file.

Format version log (the manifest's ``format_version``):

- 1 (2026-11-30): ``manifest.json``, one or more serialized ``jax.export`` modules
  (symbolic or fixed batch), weights in ``weights.safetensors``, optional
  precompiled executables as XLA compilation-cache entries under
  ``compiled/<platform>/``, and a sha256 for every file.
- 2 (2026-11-30): several targets in one artifact. ``targets`` maps ``xla`` (the
  version-1 fields ``modules``, ``platforms``, ``precompiled``, ``parity``,
  ``expires`` and ``versions``), ``onnx`` (``onnx/model.onnx`` with its weights as
  external data) and ``iree`` (one ``.vmfb`` per declared batch size and HAL
  target) to their files, versions and parity; ``skipped_targets`` records why a
  requested target was not written. Version-1 manifests read as ``{"xla": ...}``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxmint_runtime._trust import (
    MANIFEST,
    ArtifactError,
    check_files,
    check_schema,
    read_json_bounded,
)

FORMAT_NAME = "jaxmint-artifact"
FORMAT_VERSION = 2
WEIGHTS = "weights.safetensors"
COMPAT_DAYS = 180  # jax.export keeps backward compatibility for 6 months


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- safetensors: 8-byte little-endian header size, a JSON header, then raw bytes ----------

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@functools.lru_cache(maxsize=64)
def np_dtype(name: str) -> np.dtype:
    """numpy dtype by name; ``bfloat16`` comes from ml_dtypes (installed with jax and IREE)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ArtifactError(
                "this artifact holds bfloat16 arrays, which need the ml_dtypes package: "
                "pip install ml_dtypes"
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` (name -> array) as a safetensors file, in the given order."""
    header, offset = {}, 0
    arrays = []
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        dtype = str(arr.dtype)
        if dtype not in _CODES:
            raise ArtifactError(f"weight {name!r} has dtype {dtype}, which safetensors cannot hold")
        header[name] = {
            "dtype": _CODES[dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned for memory mapping
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map a safetensors file: arrays are read-only views, no copy into RAM.

    The header is untrusted: it must be a JSON object of tensors, each with a known
    dtype, a shape of non-negative integers and integer offsets inside the file whose
    length matches the shape; tensors may not overlap.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ArtifactError(f"{path.name}: truncated safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ArtifactError(f"{path.name}: header size {n} does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path.name}: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name}: the header must be a JSON object of tensors")
    data_start = 8 + n
    spans = []
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _tensor_entry(path.name, name, info)
        if not 0 <= begin <= end <= size - data_start:
            raise ArtifactError(f"{path.name}: tensor {name!r} lies outside the file")
        if (end - begin) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ArtifactError(f"{path.name}: tensor {name!r} has the wrong byte size")
        spans.append((begin, end, name))
        entries[name] = (dtype, shape, begin, end)
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise ArtifactError(f"{path.name}: tensors {a!r} and {b!r} overlap")
    memory = np.memmap(path, dtype=np.uint8, mode="r") if entries else None
    return {
        name: memory[data_start + begin : data_start + end].view(dtype).reshape(shape)
        for name, (dtype, shape, begin, end) in entries.items()
    }


def _tensor_entry(file: str, name: str, info) -> tuple[np.dtype, tuple, int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, every field type-checked."""
    if not isinstance(info, dict):
        raise ArtifactError(f"{file}: tensor {name!r}: the entry must be an object")
    code = info.get("dtype")
    if not isinstance(code, str) or code not in _DTYPES:
        raise ArtifactError(
            f"{file}: tensor {name!r}: unknown dtype {str(code)[:20]!r}; known: {sorted(_DTYPES)}"
        )
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ArtifactError(f"{file}: tensor {name!r}: shape must be a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise ArtifactError(f"{file}: tensor {name!r}: data_offsets must be two integers")
    return np_dtype(_DTYPES[code]), tuple(shape), offsets[0], offsets[1]


def _is_int(value) -> bool:
    return type(value) is int


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest, bounded in size and checked against the schema (see `_trust`)."""
    path = Path(directory) / MANIFEST
    manifest = read_json_bounded(path)
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise ArtifactError(
            f"{path}: field 'format_version' must be a positive integer, got {str(version)[:20]}"
        )
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is newer than this runtime reads "
            f"(up to {FORMAT_VERSION}); upgrade jaxmint-runtime"
        )
    if "targets" not in manifest:  # version 1: the XLA target's fields at the top level
        keys = ("modules", "platforms", "precompiled", "parity", "expires", "versions")
        manifest["targets"] = {"xla": {k: manifest[k] for k in keys if k in manifest}}
    check_schema(manifest, path)
    return manifest


def verify_files(directory: str | os.PathLike, manifest: dict, *, hashes: bool = True) -> None:
    """Every file confined, listed, regular and of its listed size; with ``hashes``, of
    its listed sha256 too. Unknown files, links and references to unlisted files are
    refused (see `_trust`)."""
    check_files(Path(directory), manifest, hashes=hashes)


MAX_LABEL_CHARS = 1024
CHECK = "check.safetensors"


def tolerance(dtype) -> tuple[float, float]:
    """``(rtol, atol)`` by which a target's output may differ from jax's; ``atol`` is
    scaled by the output's largest magnitude (at least 1)."""
    name = str(dtype)
    if name == "bfloat16":
        return 2e-2, 2e-2
    if name == "float16":
        return 5e-3, 5e-3
    if np.issubdtype(np.dtype(name), np.floating):
        return 1e-4, 1e-5
    return 0.0, 0.0  # integers and booleans must match exactly


def output_mismatch(got: np.ndarray, want: np.ndarray, *, floor: float = 0.0) -> str | None:
    """Why ``got`` is not ``want`` within `tolerance` (each at least ``floor``), or None."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{list(got.shape)} instead of {want.dtype}{list(want.shape)}"
    if not want.size:
        return None
    rtol, atol = tolerance(want.dtype)
    if want.dtype.kind in "fV":  # floating point (bfloat16 reports "V")
        rtol, atol = max(rtol, floor), max(atol, floor)
    w, g = want.astype(np.float64), got.astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(w))))
    if np.allclose(g, w, rtol=rtol, atol=atol * scale):
        return None
    err = float(np.max(np.abs(g - w)))
    return f"max abs difference {err:.3g} (tolerance rtol={rtol}, atol={atol * scale:.3g})"


def read_labels(directory: str | os.PathLike, manifest: dict) -> dict[str, list[str]]:
    """{output name: its class labels} from the files the outputs name (``labels``).

    Each file is UTF-8 text with one label per line, as many lines as the output's
    last dimension; the files were verified against the manifest before this runs.
    """
    directory = Path(directory)
    labels = {}
    for spec in manifest["outputs"]:
        if "labels" not in spec:
            continue
        path = directory / spec["labels"]
        size = manifest["files"][spec["labels"]]["bytes"]
        with open(path, "rb") as f:
            raw = f.read(size)
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ArtifactError(f"{path}: labels must be UTF-8 text ({e})") from None
        classes = spec["shape"][-1] if spec["shape"] else None
        if not isinstance(classes, int) or len(lines) != classes:
            raise ArtifactError(
                f"{path}: {len(lines)} labels for output {spec['name']!r} of shape "
                f"{spec['shape']}; it needs one label per entry of its last dimension"
            )
        for i, label in enumerate(lines):
            if len(label) > MAX_LABEL_CHARS or not label.isprintable():
                raise ArtifactError(
                    f"{path}: line {i + 1} is not a label (printable, at most "
                    f"{MAX_LABEL_CHARS} characters)"
                )
        labels[spec["name"]] = lines
    return labels


def read_weights(directory: str | os.PathLike, manifest: dict) -> list[np.ndarray]:
    """The artifact's weights in argument order (memory-mapped, read-only)."""
    directory = Path(directory)
    weights = read_safetensors(directory / WEIGHTS)
    order = manifest["weights"]["order"]
    missing = [n for n in order if n not in weights]
    if missing:
        raise ArtifactError(f"{directory / WEIGHTS}: weights {missing[:3]} are missing")
    return [weights[n] for n in order]
