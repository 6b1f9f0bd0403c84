"""Compile an artifact's module for its declared batch sizes in a clean process.

    python -m jaxmint_runtime.precompile ARTIFACT_DIR CACHE_DIR

Used by export: it runs in a fresh process so the compilation cache starts
empty and holds exactly this artifact's executables, which export then ships.
Prints one JSON object: the platform key and the cache entries written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    artifact, cache_dir = (argv if argv is not None else sys.argv[1:])[:2]
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir).absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

    from jaxmint_runtime import _cache
    from jaxmint_runtime._predictor import load

    _cache.configure()
    predictor = load(
        artifact,
        backend="xla",
        precompiled=False,
        warmup=False,
        verify=False,
        allow_expired=True,
    )
    predictor.warmup()
    entries = sorted(p.name for p in Path(cache_dir).iterdir() if p.is_file())
    print(json.dumps({**_cache.platform_key(), "entries": entries}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
