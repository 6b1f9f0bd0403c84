"""Helpers for the attack tests: read and rewrite an artifact's manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxmint_runtime._format import sha256_file

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
from runtime_helpers import parse_responses, raw_exchange

__all__ = ["manifest", "parse_responses", "raw_exchange", "write_manifest"]


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def write_manifest(directory: Path, data: dict, *, rehash: bool = False) -> None:
    """Write a tampered manifest; ``rehash`` lists every file as it now is (a
    self-consistent hostile artifact rather than a damaged one)."""
    if rehash:
        data["files"] = {
            p.relative_to(directory).as_posix(): {
                "sha256": sha256_file(p),
                "bytes": p.stat().st_size,
            }
            for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != "manifest.json"
        }
    (directory / "manifest.json").write_text(json.dumps(data))
