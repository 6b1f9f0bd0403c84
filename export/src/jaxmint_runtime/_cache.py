"""Precompiled executables as XLA compilation-cache entries.

Export compiles the portable module for each declared batch size in a clean
process whose persistent compilation cache is empty, and ships the entries it
wrote. At load, the entries that match this platform and jaxlib are copied into
the process's cache directory; JAX's own cache lookup then finds them, so no XLA
compilation happens. The cache key covers the module, the compile options, the
device kind and the jaxlib version: an entry that does not match is never used.

Cost: loading turns JAX's persistent compilation cache on for the process (in
``$JAXMINT_CACHE_DIR``, default ``~/.cache/jaxmint-runtime/xla``) unless the
process already set ``jax_compilation_cache_dir``, and sets
``jax_persistent_cache_enable_xla_caches`` to ``none`` so that cache keys do not
depend on the directory's path.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import jax

from jaxmint_runtime._format import sha256_file

log = logging.getLogger("jaxmint_runtime")

_LOADED = "loaded"  # in the cache, per entry name: the digest of the executable XLA last loaded
_EVENTS: Counter = Counter()
_LOCK = threading.Lock()
_LISTENING = False


def _listen(event: str, **kwargs) -> None:
    if event.startswith("/jax/compilation_cache/"):
        with _LOCK:
            _EVENTS[event.rsplit("/", 1)[-1]] += 1


def cache_events() -> dict[str, int]:
    """Counts of compilation-cache events (``cache_hits``, ``cache_misses``) so far."""
    with _LOCK:
        return dict(_EVENTS)


def configure(directory: str | os.PathLike | None = None) -> Path:
    """Turn the persistent compilation cache on (if not already) and return its directory."""
    global _LISTENING
    if not _LISTENING:
        jax.monitoring.register_event_listener(_listen)
        _LISTENING = True
    current = jax.config.jax_compilation_cache_dir
    if current:
        path = Path(current)
    else:
        path = Path(
            directory
            or os.environ.get("JAXMINT_CACHE_DIR")
            or Path.home() / ".cache" / "jaxmint-runtime" / "xla"
        )
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    return path


def install(entries: list[tuple[Path, str]], cache_dir: Path) -> list[tuple[Path, str]]:
    """Put verified cache entries into ``cache_dir``; return ``(path there, sha256)`` pairs.

    ``entries`` are ``(file, sha256)`` pairs already verified against the artifact's
    manifest. The shared cache is not trusted: an entry already there is read and
    compared with that digest, and one that differs is replaced. Artifacts of one
    program (versions of a model: same module, other weights) ship executables under
    the same key whose bytes differ, so an entry that XLA loaded for another verified
    artifact (`mark_loaded`) is replaced quietly; any other (written by JAX itself,
    damaged or planted) is set aside with a warning naming it. Writes are atomic (a
    temporary file, then a rename).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    installed = []
    for src, digest in entries:
        dst = cache_dir / src.name
        have = sha256_file(dst) if dst.is_file() and not dst.is_symlink() else None
        if have == digest:
            installed.append((dst, digest))
            continue
        if have is not None and have == _loaded_digest(cache_dir, src.name):
            log.info(
                "replacing the compilation cache entry %s, which another artifact of the same "
                "program (another version of the model) put there",
                dst,
            )
        elif dst.exists() or dst.is_symlink():
            set_aside(
                dst,
                "its content differs from the artifact's verified entry, and no artifact's "
                "executable was loaded from it: JAX may have written it, or it is damaged or "
                "was planted",
            )
        tmp = cache_dir / f".{src.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        installed.append((dst, digest))
    return installed


def mark_loaded(entries: list[tuple[Path, str]]) -> None:
    """Record that XLA loaded these installed ``(path, sha256)`` entries of a verified
    artifact, so that another artifact of the same program may replace them quietly.
    An entry already recorded with its digest is not written again."""
    for path, digest in entries:
        if _loaded_digest(path.parent, path.name) == digest:
            continue
        folder = path.parent / _LOADED
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(digest, encoding="ascii")
        os.replace(tmp, folder / path.name)


def _loaded_digest(cache_dir: Path, name: str) -> str | None:
    try:
        return (cache_dir / _LOADED / name).read_text(encoding="ascii")[:64]
    except (OSError, UnicodeDecodeError):
        return None


def set_aside(entry: Path, why: str) -> None:
    """Move a cache entry to ``<cache>/set-aside/`` (kept for inspection, never read)."""
    folder = entry.parent / "set-aside"
    folder.mkdir(exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}.{time.time_ns() % 10**9}"
    target = folder / f"{entry.name}.{stamp}"  # unique: nothing set aside is overwritten
    try:
        os.replace(entry, target)
    except FileNotFoundError:
        return
    log.warning("set aside the compilation cache entry %s (%s): moved to %s", entry, why, target)


def platform_key() -> dict:
    """What a precompiled executable must match: platform, device kind and jaxlib."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "jaxlib": jaxlib.__version__,
    }
