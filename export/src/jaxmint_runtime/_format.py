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

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

FORMAT_NAME = "jaxmint-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
COMPAT_DAYS = 180  # jax.export keeps backward compatibility for 6 months


class ArtifactError(ValueError):
    """An artifact cannot be loaded safely; the message names the file and the reason."""


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
    """Memory-map a safetensors file: arrays are read-only views, no copy into RAM."""
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
        except ValueError as e:
            raise ArtifactError(f"{path.name}: unreadable header ({e})") from None
    data_start = 8 + n
    memory = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= size - data_start:
            raise ArtifactError(f"{path.name}: tensor {name!r} lies outside the file")
        dtype = np_dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if (end - begin) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ArtifactError(f"{path.name}: tensor {name!r} has the wrong byte size")
        tensors[name] = memory[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return tensors


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is newer than this runtime reads "
            f"(up to {FORMAT_VERSION}); upgrade jaxmint-runtime"
        )
    if "targets" not in manifest:  # version 1: the XLA target's fields at the top level
        keys = ("modules", "platforms", "precompiled", "parity", "expires", "versions")
        manifest["targets"] = {"xla": {k: manifest[k] for k in keys if k in manifest}}
    return manifest


def verify_files(directory: str | os.PathLike, manifest: dict) -> None:
    """Check every file against the manifest's sha256; refuse unknown files."""
    directory = Path(directory)
    listed = manifest.get("files", {})
    for rel, info in listed.items():
        path = directory / rel
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != info["bytes"]:
            raise ArtifactError(
                f"{path}: {path.stat().st_size} bytes, the manifest says {info['bytes']} "
                "(truncated or replaced)"
            )
        if sha256_file(path) != info["sha256"]:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (file was modified)")
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in listed:
            raise ArtifactError(
                f"{path}: not part of the artifact (not in the manifest); remove it"
            )


def read_weights(directory: str | os.PathLike, manifest: dict) -> list[np.ndarray]:
    """The artifact's weights in argument order (memory-mapped, read-only)."""
    directory = Path(directory)
    weights = read_safetensors(directory / WEIGHTS)
    order = manifest["weights"]["order"]
    missing = [n for n in order if n not in weights]
    if missing:
        raise ArtifactError(f"{directory / WEIGHTS}: weights {missing[:3]} are missing")
    return [weights[n] for n in order]
