"""Compiled once per process: the init of a model that `fit` has already seen.

`fit` jits a fresh closure on every call, so JAX's own caches (keyed by the
function) miss, and every call compiled the model's init again: the random
initializers of each parameter shape, most of the fixed cost per call that
``benchmarks/overhead.py`` reports. Sweeps, tests and debugging run many short
fits of the same model. This cache is keyed by the
*content* of the lowered program (its StableHLO text, which spells out every
constant and sharding), the types and tree structures of its arguments and
results, and the devices, so a program that differs in any
value or layout compiles anew; the same program runs the executable already
compiled. Values are identical either way: it is the same executable.

Across processes, `use_persistent_cache` (``fit(..., compile_cache=...)``) turns on
JAX's persistent compilation cache, so that a rerun loads what a run compiled.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax

log = logging.getLogger("jaxmint")

# JAX keeps only programs that took this long to compile; its own default (1 s)
# leaves out most CPU programs, among them a small model's train step.
_CACHE_MIN_COMPILE_SECONDS = 0.1

_MAX_ENTRIES = 16
_compiled: OrderedDict[tuple, Any] = OrderedDict()


def call_compiled(fn: Callable, *args, out_shardings=None):
    """``jax.jit(fn, out_shardings=...)(*args)``, compiling only programs not seen before."""
    jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
    lowered = jitted.lower(*args)
    # The arguments' types and both tree structures too: an argument the program does
    # not use is pruned from its text, but the executable still checks it, and the
    # same program may build a different container (class) of outputs.
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (
        hashlib.sha256(lowered.as_text().encode()).hexdigest(),
        treedef,
        lowered.out_tree,
        tuple(repr(jax.typeof(x)) for x in leaves),
        tuple(d.id for d in jax.devices()),
        jax.process_index(),
        jax.process_count(),
    )
    executable = _compiled.get(key)
    if executable is None:
        executable = lowered.compile()
        _compiled[key] = executable
        while len(_compiled) > _MAX_ENTRIES:
            _compiled.popitem(last=False)
    else:
        _compiled.move_to_end(key)
    return executable(*args)


def clear() -> None:
    """Forget every executable (tests use it to measure a cold compile)."""
    _compiled.clear()


def cache_folder(directory: str | os.PathLike) -> str:
    """``compile_cache`` as an absolute path (``~`` expanded)."""
    return os.path.abspath(os.path.expanduser(os.fspath(directory)))


def use_persistent_cache(directory: str | os.PathLike) -> str | None:
    """Turn JAX's persistent compilation cache on in ``directory``; return the folder used.

    For the rest of the process, every program that takes over 0.1 s to compile
    (unless ``jax_persistent_cache_min_compile_time_secs`` was set) is kept there,
    and a program compiled before, in this process or another, is loaded instead:
    a rerun, a resumed run or a replayed step starts without compiling. The entry
    is keyed by the program, the compile options, the devices and jaxlib, so the
    executable (and every number it computes) is the one a compile would build.
    JAX reads its cache folder once: if the process already uses another one, that
    one stays, with a warning; a folder that cannot be created is warned about, and
    the run compiles as it would without one.
    """
    path = cache_folder(directory)
    current = jax.config.jax_compilation_cache_dir
    if current and os.path.abspath(current) != path:
        log.warning(
            "compile_cache=%s is not used: this process already keeps compiled programs in %s "
            "(JAX reads its cache folder once)",
            path,
            current,
        )
        return current
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # (a file there is refused earlier, by FitConfig.check_values)
        log.warning("compile_cache=%s is not used: %s; every program compiles", path, e.strerror)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_SECONDS)
    return path
