"""Where a non-finite value that reaches the loss or the gradient was born.

``jax.debug_nans``/``debug_infs`` stop at the first primitive that makes a NaN
or an inf, wherever it goes: an attention's intentional ``-inf`` mask, which the
softmax turns back into zeros, stops them before the real fault. Here the step's
program (its jaxpr, the backward pass included) is evaluated equation by
equation, each value marked finite or not; then, from the non-finite outputs that
matter (the loss, its terms, the gradient norm), the walk goes backwards through
non-finite values only. A non-finite value that never reaches them (the mask) is
never visited. Where the walk ends, an equation made a non-finite value out of
finite ones (or read a non-finite constant): that is the origin, reported with
the user's source line and, when the name stack has it, the module path.

Calls (``jit``, custom derivative rules, ``remat``) are entered, so the origin is
a primitive of the user's code; loops and conditionals are judged as one
operation (their source line still names where they were written).
"""

from __future__ import annotations

import itertools
import os
import re
import traceback
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# Equations whose sub-program is entered, and the parameter that holds it.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


@dataclass
class Origin:
    """An equation that made a non-finite value from finite inputs."""

    order: int  # position in evaluation order
    primitive: str
    what: str  # "nan", "inf" or "nan and inf"
    where: str  # "file.py:LINE in function"
    user: str | None  # the innermost frame outside jax, flax, optax and jaxmint
    scope: str  # the name stack (a flax module path, transforms), "" when none
    constant: bool  # a non-finite constant was its input (no finite-to-non-finite op)
    peak: float | None = None  # the largest |input| when it made inf from finite inputs

    def sentence(self) -> str:
        place = self.user or self.where
        if self.what == "inf" and self.peak is not None and not self.constant:
            made = f"overflowed to inf (its input reached {self.peak:.2g})"
        else:
            made = f"made {self.what}"
        text = f"{self.primitive} {made} at {place}"
        if self.user and self.user != self.where:
            text += f" (inside {self.where})"
        if self.scope:
            text += f", in {self.scope}"
        if self.constant:
            text += ", from a non-finite constant it was given"
        return text


def _nonfinite(value) -> str | None:
    x = np.asarray(value) if not isinstance(value, jax.Array) else value
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return None
    nan, inf = bool(jnp.isnan(x).any()), bool(jnp.isinf(x).any())
    if nan and inf:
        return "nan and inf"
    return "nan" if nan else "inf" if inf else None


def _peak(value) -> float:
    x = jnp.asarray(value)
    if x.size == 0 or not jnp.issubdtype(x.dtype, jnp.number):
        return 0.0
    return float(jnp.max(jnp.abs(x.astype(jnp.float32))))


_LIBRARIES = (f"{os.sep}jax{os.sep}", f"{os.sep}jaxlib{os.sep}", "site-packages", "dist-packages")
_OWN = (f"{os.sep}jaxmint{os.sep}",)


def _frames(eqn):
    tb = getattr(eqn.source_info, "traceback", None)
    if tb is None:
        return []
    return [(f.file_name, f.line_num, f.function_name) for f in tb.frames]


def _describe(frame) -> str:
    file, line, fn = frame
    return f"{os.path.basename(file)}:{line} in {fn}"


def _places(eqn, caller: set) -> tuple[str, str | None]:
    """The innermost frame outside jax (maybe in a library) and the innermost
    frame of the user's own code (outside every installed package and jaxmint);
    frames of the code that asked for the diagnosis (``caller``) are not candidates."""
    frames = [f for f in _frames(eqn) if f[:2] not in caller]
    outside_jax = [f for f in frames if f"{os.sep}jax{os.sep}" not in f[0] and "jaxlib" not in f[0]]
    user = [f for f in frames if not any(p in f[0] for p in _LIBRARIES + _OWN)]
    where = _describe(outside_jax[0]) if outside_jax else "(no source line)"
    return where, _describe(user[0]) if user else None


def _scope(eqn) -> str:
    """The module path of the name stack, without the transforms (``jvp(...)``)."""
    text = re.sub(r"[A-Za-z_]+\(", "", str(eqn.source_info.name_stack)).replace(")", "")
    return "/".join(part for part in text.split("/") if part)


class _Tape:
    def __init__(self, caller: set):
        self.caller = caller
        self.ids = itertools.count()
        self.producer: dict[int, tuple[int, list[int], object]] = {}  # id -> (order, ins, eqn)
        self.bad: dict[int, str] = {}  # id -> "nan" / "inf" / "nan and inf"
        self.order = itertools.count()
        self.peak: dict[int, float] = {}  # order -> largest |input| of an op that made inf

    def value(self, value) -> int:
        i = next(self.ids)
        kind = _nonfinite(value)
        if kind:
            self.bad[i] = kind
        return i

    def run(self, jaxpr, consts, args):
        """Evaluate ``jaxpr``; ``args`` are (value, id) pairs. Returns (value, id) pairs."""
        env = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return v.val, self.value(v.val)
            return env[v]

        for var, c in zip(jaxpr.constvars, consts, strict=True):
            env[var] = (c, self.value(c))
        for var, a in zip(jaxpr.invars, args, strict=True):
            env[var] = a
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            sub = eqn.params.get(_CALLS.get(name, ""), None)
            if sub is not None:
                closed = sub if isinstance(sub, jcore.ClosedJaxpr) else None
                inner = closed.jaxpr if closed else sub
                inner_consts = closed.consts if closed else []
                n = len(inner.invars)
                outs = self.run(inner, inner_consts, ins[len(ins) - n :])
            else:
                values = eqn.primitive.bind(*[v for v, _ in ins], **eqn.params)
                if not eqn.primitive.multiple_results:
                    values = [values]
                order = next(self.order)
                outs = []
                for value in values:
                    i = self.value(value)
                    self.producer[i] = (order, [j for _, j in ins], eqn)
                    outs.append((value, i))
                born = any(i in self.bad for _, i in outs)
                if born and not any(j in self.bad for _, j in ins):
                    self.peak[order] = max((_peak(v) for v, _ in ins), default=0.0)
            for var, out in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, jcore.DropVar):
                    env[var] = out
        return [read(v) for v in jaxpr.outvars]

    def origins(self, targets: list[int]) -> list[Origin]:
        """Walk back from the non-finite ``targets`` through non-finite values only."""
        found, seen, stack = {}, set(), [t for t in targets if t in self.bad]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if i not in self.producer:
                continue  # a non-finite input of the whole step (the data): reported apart
            order, ins, eqn = self.producer[i]
            bad_ins = [j for j in ins if j in self.bad]
            produced = [j for j in bad_ins if j in self.producer]
            if produced:
                stack.extend(produced)
                continue
            where, user = _places(eqn, self.caller)
            found[order] = Origin(
                order,
                eqn.primitive.name,
                self.bad[i],
                where,
                user,
                _scope(eqn),
                constant=bool(bad_ins),
                peak=self.peak.get(order),
            )
        return [found[k] for k in sorted(found)]


def nonfinite_origins(fn, *args) -> list[Origin]:
    """Evaluate ``fn(*args)`` equation by equation and return, in evaluation order,
    where the non-finite values that reach any of its outputs were born."""
    caller = {(f.filename, f.lineno) for f in traceback.extract_stack()}
    closed = jax.make_jaxpr(fn)(*args)
    tape = _Tape(caller)
    leaves = jax.tree_util.tree_leaves(args)
    outs = tape.run(closed.jaxpr, closed.consts, [(x, tape.value(x)) for x in leaves])
    return tape.origins([i for _, i in outs])
