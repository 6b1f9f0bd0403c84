"""A model repository: ``ROOT/<model>/<version>/`` artifact directories, and which to serve.

Layout, as Triton's and KServe's: each model is a directory named after it, each
version a numbered subdirectory holding an artifact. A model directory that is
itself an artifact is that model's version 1, and so is a single artifact given
on its own, so ``jaxmint-serve ARTIFACT_DIR`` keeps working.

A `VersionPolicy` picks the versions to serve among those on disk that load:
``latest:N`` (default ``latest:1``), ``all``, or ``specific:1,3``. Only names of
letters, digits, ``_``, ``.`` and ``-`` are models, and only positive integers
without leading zeros are versions; anything else in the repository is skipped
with a log line (never followed through links).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from jaxmint_runtime._trust import MANIFEST

log = logging.getLogger("jaxmint_runtime.serve")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


class RepositoryError(ValueError):
    """The repository or the version policy cannot be used; the message says why."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: the newest ``latest``, ``all``, or ``specific``."""

    kind: str = "latest"
    latest: int = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "all" and not arg:
                return cls("all")
            if kind == "latest":
                n = int(arg or 1)
                if n >= 1:
                    return cls("latest", latest=n)
            if kind == "specific":
                versions = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
                if versions and versions[0] >= 1:
                    return cls("specific", specific=versions)
        except ValueError:
            pass
        raise RepositoryError(
            f"version policy {text[:60]!r} is not one of latest:N (N >= 1), all, specific:V1,V2,..."
        )

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve, from those that are on disk and load, ascending."""
        available = sorted(available)
        if self.kind == "all":
            return available
        if self.kind == "latest":
            return available[-self.latest :]
        return [v for v in available if v in self.specific]

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.latest}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.specific))
        return "all"


def is_artifact(path: Path) -> bool:
    return _regular(path / MANIFEST)


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _directory(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # lstat: a link is not followed
    except OSError:
        return False


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """{model name: {version: artifact directory}} of a repository directory."""
    if not _directory(root):
        raise RepositoryError(
            f"{root} is not an artifact (no manifest.json) nor a model repository directory"
        )
    models: dict[str, dict[int, Path]] = {}
    for entry in sorted(os.listdir(root)):
        path = root / entry
        if not _directory(path) or entry.startswith("."):
            continue
        if not _NAME.match(entry):
            log.warning("repository %s: %r is not a model name; skipped", root, entry[:80])
            continue
        if is_artifact(path):
            models[entry] = {1: path}
            continue
        versions = {}
        for sub in os.listdir(path):
            if not _directory(path / sub) or sub.startswith("."):
                continue
            if not _VERSION.match(sub):
                log.warning("repository %s: %r is not a version number; skipped", path, sub[:80])
                continue
            if is_artifact(path / sub):
                versions[int(sub)] = path / sub
        if versions:
            models[entry] = versions
    return models
