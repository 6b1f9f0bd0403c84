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
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax

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
