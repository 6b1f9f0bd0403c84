"""What the loader checks before it opens anything: an artifact is untrusted input.

The rule, in the order it is applied (docs/artifact-format.md, "Trust model"):

1. ``manifest.json`` is a regular file of at most `MAX_MANIFEST_BYTES`, valid JSON,
   and valid against ``manifest.schema.json`` (types, ranges, path syntax).
2. Every path in it is a relative POSIX path of plain segments: no absolute path,
   no ``.`` or ``..``, no backslash, NUL or other control character.
3. Every file any target opens (modules, weights, precompiled executables, the
   ONNX graph and its data, IREE modules) is listed in ``files``.
4. Nothing in the directory is a symlink, a hard link, a device or anything but a
   directory or a regular file, and every regular file is listed.
5. Each listed file is a regular file inside the directory whose size is the
   listed size (checked before reading a byte), and whose sha256 is the listed
   one (read up to that size and no further).

Every failure is an `ArtifactError` naming the artifact's file and the manifest
field; nothing about a file outside the artifact is ever opened or reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class ArtifactError(ValueError):
    """An artifact cannot be loaded safely; the message names the file and the reason."""


@cache
def schema() -> dict:
    """The manifest's JSON Schema (shipped in the package, published in the docs)."""
    text = resources.files("jaxmint_runtime").joinpath("manifest.schema.json").read_text()
    return json.loads(text)


def read_json_bounded(path: Path) -> dict:
    """``manifest.json`` as a dict: a regular file (no symlink) of bounded size."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path.parent} is not an artifact: it has no {MANIFEST}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{path}: not a regular file (a symlink or a device is refused)")
    if info.st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path}: {info.st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have"
        )
    with _open_regular(path) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: the manifest must be a JSON object")
    return manifest


def check_schema(manifest: dict, where: Path) -> None:
    """Raise `ArtifactError` naming the first field that breaks the schema."""
    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ArtifactError(f"{where}: field {field!r}: {_short(error.message)}")


def referenced_files(manifest: dict) -> list[tuple[str, str]]:
    """``(path, field)`` of every file a target may open."""
    refs = []
    targets = manifest.get("targets", {})
    if ("xla" in targets or "iree" in targets) and "weights" in manifest:
        refs.append((manifest["weights"]["file"], "weights.file"))
    for i, m in enumerate(targets.get("xla", {}).get("modules", [])):
        refs.append((m["file"], f"targets.xla.modules[{i}].file"))
    for i, entry in enumerate(targets.get("xla", {}).get("precompiled", [])):
        for j, f in enumerate(entry["files"]):
            refs.append((f, f"targets.xla.precompiled[{i}].files[{j}]"))
    if "onnx" in targets:
        refs.append((targets["onnx"]["file"], "targets.onnx.file"))
        for i, f in enumerate(targets["onnx"]["files"]):
            refs.append((f, f"targets.onnx.files[{i}]"))
    for i, m in enumerate(targets.get("iree", {}).get("modules", [])):
        refs.append((m["file"], f"targets.iree.modules[{i}].file"))
    if "check" in manifest:
        refs.append((manifest["check"]["file"], "check.file"))
    for i, spec in enumerate(manifest.get("outputs", [])):
        if "labels" in spec:
            refs.append((spec["labels"], f"outputs[{i}].labels"))
    return refs


def check_files(directory: Path, manifest: dict, *, hashes: bool = True) -> None:
    """Rules 3 to 5 of the module docstring (``hashes=False`` skips the sha256 only)."""
    listed = manifest["files"]
    for rel, field in referenced_files(manifest):
        if rel not in listed:
            raise ArtifactError(
                f"{directory}: {field} names {rel!r}, which is not listed in the manifest's "
                "files (so it could not be verified)"
            )
    _check_tree(directory, listed)
    for rel, info in listed.items():
        verify_file(directory, rel, info, hashes=hashes)


def verify_file(directory: Path, rel: str, info: dict, *, hashes: bool = True) -> Path:
    """The checked path of one listed file (rule 5)."""
    path = directory / rel
    try:
        with _open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size != info["bytes"]:
                raise ArtifactError(
                    f"{path}: {size} bytes, the manifest says {info['bytes']} "
                    "(truncated or replaced)"
                )
            if hashes and _sha256(f, info["bytes"]) != info["sha256"]:
                raise ArtifactError(
                    f"{path}: sha256 does not match the manifest (file was modified)"
                )
    except FileNotFoundError:
        raise ArtifactError(f"{path}: listed in the manifest but missing") from None
    return path


def _check_tree(directory: Path, listed: dict) -> None:
    """Rule 4: walk without following links; refuse anything but listed regular files."""
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise ArtifactError(f"{path}: a symlink inside the artifact is refused")
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise ArtifactError(f"{path}: not a regular file (a device or a pipe is refused)")
            if info.st_nlink > 1:
                raise ArtifactError(
                    f"{path}: a hard link (it has {info.st_nlink} names) is refused; copy the file"
                )
            if rel != MANIFEST and rel not in listed:
                raise ArtifactError(
                    f"{path}: not part of the artifact (not in the manifest); remove it"
                )


def _open_regular(path: Path):
    """Open for reading without following a final symlink, and only a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise ArtifactError(f"{path}: a directory where a file is expected") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ArtifactError(f"{path}: cannot be opened safely ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory where a file is expected" if stat.S_ISDIR(mode) else "not a file"
        raise ArtifactError(f"{path}: {what}")
    return os.fdopen(fd, "rb")


def _sha256(f, size: int) -> str:
    digest, left = hashlib.sha256(), size
    while left > 0:
        chunk = f.read(min(1 << 20, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
