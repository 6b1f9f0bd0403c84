"""Helpers for the attack tests: read and rewrite an artifact's manifest."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from jaxmint_runtime._format import sha256_file


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


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, half-close, and read everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split a byte stream into HTTP responses (Content-Length framed)."""
    out = []
    while data:
        end = data.index(b"\r\n\r\n")
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        out.append((status, headers, data[end + 4 : end + 4 + length]))
        data = data[end + 4 + length :]
    return out
