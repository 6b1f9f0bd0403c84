"""Step wrappers: debug mode (un-jitted steps on concrete arrays) and checked steps (checkify).

`fit(..., debug=True)` and `fit(..., check=True)` wrap the pure steps with these;
the normal path never does, so it stays exactly as fast as before.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

import jax
from jax._src import checkify as impl
from jax.experimental import checkify

from jaxmint.losses import LossInputs
from jaxmint.models._model import join_variables
from jaxmint.run import DebugRunError

log = logging.getLogger("jaxmint")

# Frames of these files are plumbing; the location of a failed check is the
# innermost frame elsewhere (the user's model, loss term or metric).
_PLUMBING = (
    f"{os.sep}jax{os.sep}",
    f"{os.sep}jaxlib{os.sep}",
    f"{os.sep}flax{os.sep}",
    f"{os.sep}optax{os.sep}",
    f"jaxmint{os.sep}train{os.sep}",
    f"jaxmint{os.sep}steps{os.sep}",
    f"jaxmint{os.sep}debug{os.sep}",
    f"jaxmint{os.sep}losses{os.sep}_algebra.py",
    f"jaxmint{os.sep}models{os.sep}_flax.py",
    f"jaxmint{os.sep}models{os.sep}_model.py",
)


class CheckError(FloatingPointError):
    """A checked step (``fit(..., check=True)``) failed: a NaN, a bad index, a user check.

    Attributes:
      step: the step that failed (1-based, as logged).
      error: checkify's own message.
      where: ``file:line (function)`` of the failing operation, or None.
    """

    def __init__(self, message: str, *, step: int, error: str, where: str | None):
        super().__init__(message)
        self.step, self.error, self.where = step, error, where


def single_device(strategy: str, mode: str) -> str:
    """The strategy of a debug or check run: one device of one process."""
    if jax.process_count() > 1:
        raise ValueError(
            f"{mode} mode runs on one device of one process; run it without jax.distributed "
            "(one process)"
        )
    if strategy != "single":
        log.warning("%s mode runs on one device: strategy %r ignored", mode, strategy)
    return "single"


# -- debug mode -----------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence ``print`` and ``breakpoint()`` (for the gradient pass of a debug step)."""
    hook = sys.breakpointhook
    sys.breakpointhook = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        sys.breakpointhook = hook


def debug_steps(steps, model, loss, *, input_key: str, grad_accum: int):
    """``(train_step, eval_step)`` that run eagerly under ``jax.disable_jit()``.

    The train step first runs the model and the loss on concrete arrays (what a
    ``print`` or ``breakpoint()`` there shows), then the pure train step itself,
    whose gradient pass sees tracers (autodiff always traces): that second pass
    runs with ``print`` and ``breakpoint()`` silenced, so each fires once per step
    with real values.
    """

    def concrete_pass(state, batch):
        key = jax.random.fold_in(state.rng, state.step)
        variables = join_variables(state.params, state.model_state)
        for i in range(grad_accum):
            # The same micro-batches (rows i, i+k, ...) and keys as the train step.
            mb = batch if grad_accum == 1 else {k: v[i::grad_accum] for k, v in batch.items()}
            mkey = key if grad_accum == 1 else jax.random.fold_in(key, i)
            outputs, updates = model.forward(variables, mb[input_key], train=True, key=mkey)
            inputs = LossInputs(
                outputs, mb, state.params, dict(updates).get("intermediates", {}), state.step
            )
            loss(inputs, state.loss_state)

    def train_step(state, batch):
        with jax.disable_jit():
            concrete_pass(state, batch)
            try:
                with _quiet():
                    return steps.train_step(state, batch)
            except _CONVERSIONS as e:
                raise DebugRunError(
                    "debug mode runs the model and the loss twice per step: first on concrete "
                    "arrays (that pass worked: print, breakpoint() and float() see real values "
                    "there), then under jax.grad, where values are tracers and a conversion to "
                    f"Python failed ({type(e).__name__}: {str(e).splitlines()[0]}). Guard such "
                    "code with `if jaxmint.debug.is_concrete(x):`."
                ) from e

    def eval_step(state, batch, num_valid):
        with jax.disable_jit():
            return steps.eval_step(state, batch, num_valid)

    return train_step, eval_step


_CONVERSIONS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def is_concrete(*values) -> bool:
    """True when no value is a tracer: inside a debug step's concrete pass, or outside jit.

    In debug mode the model and loss run once on concrete arrays and once under
    ``jax.grad``; guard code that turns arrays into Python values with it::

        if jaxmint.debug.is_concrete(logits):
            print(float(logits.max()))
    """
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(values))


# -- checked steps --------------------------------------------------------------

ERRORS = checkify.all_checks
"""What a checked step looks for: NaNs, integer division by zero, out-of-bounds
indexing, and the user's own ``checkify.check`` calls."""


def checked_train_step(train_step):
    """The train step under ``checkify``, jitted with its state donated.

    Returns ``step(state, batch) -> (error, (state, metrics))``; `raise_check`
    turns a set error into a `CheckError`. Compiles once, like the plain step.
    """
    _patch_batched_scatter_check()
    return jax.jit(checkify.checkify(train_step, errors=ERRORS), donate_argnums=0)


def _patch_batched_scatter_check() -> None:
    """Skip checkify's bounds check on scatters with batching dimensions.

    jax's check (``scatter_oob``) ignores ``operand_batching_dims`` and fails with an
    IndexError while tracing, e.g. on the gradient of ``take_along_axis`` in every
    cross-entropy. Those scatters only transpose a gather whose indices are checked
    in the forward pass, so nothing is lost; NaN checks still apply to them.
    """

    table = getattr(impl, "error_checks", None)
    oob = getattr(impl, "OOBError", None)
    if table is None or oob is None:
        return
    for prim in list(table):
        rule = table[prim]
        if not prim.name.startswith("scatter") or getattr(rule, "_jaxmint_patched", False):
            continue

        def patched(error, enabled_errors, *args, _rule=rule, **params):
            dnums = params.get("dimension_numbers")
            if getattr(dnums, "operand_batching_dims", ()):
                enabled_errors = frozenset(e for e in enabled_errors if e is not oob)
            return _rule(error, enabled_errors, *args, **params)

        patched._jaxmint_patched = True
        table[prim] = patched


def checked_steps(steps):
    """``(train_step, eval_step)`` under checkify: each raises `CheckError` when a check fails."""
    checked = checked_train_step(steps.train_step)
    checked_eval = jax.jit(checkify.checkify(steps.eval_step, errors=ERRORS))

    def train_step(state, batch):
        error, (state, out) = checked(state, batch)
        raise_check(error, int(state.step))  # a host sync per step, only in check mode
        return state, out

    def eval_step(state, batch, num_valid):
        error, out = checked_eval(state, batch, num_valid)
        raise_check(error, int(state.step), what="the evaluation after step")
        return out

    return train_step, eval_step


def raise_check(error, step: int, rerun: str | None = None, *, what: str = "checked step") -> None:
    """Raise a `CheckError` naming ``step`` if checkify's ``error`` is set (a host sync)."""
    exc = error.get_exception()
    if exc is None:
        return
    message = str(exc).strip().rstrip(".")
    where = _location(exc)
    hint = rerun or (
        f"fit(..., debug=True, replay_from=<this workdir>, stop_after={step}, workdir=<another "
        "dir>) replays it un-jitted from the newest checkpoint before it, with the same schedules, "
        "so a print or breakpoint() in the model or loss term shows the real arrays"
    )
    raise CheckError(
        f"{what} {step} failed: {message}"
        + (f" at {where}" if where else "")
        + f". To rerun that step in debug mode: {hint}.",
        step=step,
        error=message,
        where=where,
    )


def _location(exc) -> str | None:
    tb = getattr(exc, "traceback_info", None)
    frames = getattr(tb, "frames", None) or []
    for frame in frames:  # innermost first
        if not any(p in frame.file_name for p in _PLUMBING):
            return f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
    return None
