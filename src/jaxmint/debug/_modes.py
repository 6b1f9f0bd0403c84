"""Debug mode (un-jitted steps on concrete arrays), checked steps (checkify) and run marks.

`fit(..., debug=True)` and `fit(..., check=True)` call into this module; the
normal path never does, so it stays exactly as fast as before.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import jax
from jax.experimental import checkify

MARKER = "DEBUG_RUN"
"""The file that marks a run dir as written by a debug run."""

# Frames of these files are plumbing; the location of a failed check is the
# innermost frame elsewhere (the user's model, loss term or metric).
_PLUMBING = (
    f"{os.sep}jax{os.sep}",
    f"{os.sep}jaxlib{os.sep}",
    f"{os.sep}flax{os.sep}",
    f"{os.sep}optax{os.sep}",
    f"jaxmint{os.sep}train{os.sep}",
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


class DebugRunError(RuntimeError):
    """A run dir written in debug mode was about to be resumed by a normal run, or vice versa."""


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
    from jaxmint.losses import LossInputs

    def concrete_pass(state, batch):
        key = jax.random.fold_in(state.rng, state.step)
        variables = {"params": state.params, **state.model_state}
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
    from jax._src import checkify as impl

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


def raise_check(error, step: int, rerun: str | None = None, *, what: str = "checked step") -> None:
    """Raise a `CheckError` naming ``step`` if checkify's ``error`` is set (a host sync)."""
    exc = error.get_exception()
    if exc is None:
        return
    message = str(exc).strip().rstrip(".")
    where = _location(exc)
    hint = rerun or (
        f"fit(..., steps={step}, debug=True, workdir=<another dir>) replays the same batches "
        "un-jitted, so a print or breakpoint() in the model or loss term shows the real arrays"
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


# -- run marks ------------------------------------------------------------------


def recorded_debug(workdir: Path) -> bool | None:
    """Whether ``workdir`` holds a debug run (True), a normal run (False), or nothing (None)."""
    if (workdir / MARKER).exists():
        return True
    path = workdir / "config.json"
    if not path.exists():
        return None
    try:
        return bool(json.loads(path.read_text()).get("debug", False))
    except (OSError, ValueError):
        return None


def check_run_kind(workdir: Path, debug: bool, *, fresh: bool, has_checkpoints: bool) -> None:
    """Refuse to resume a debug run as a normal one, or the other way round."""
    recorded = recorded_debug(workdir)
    if fresh or recorded is None or recorded == debug or not has_checkpoints:
        return
    was, now = ("a debug run", "a normal run") if recorded else ("a normal run", "a debug run")
    raise DebugRunError(
        f"the run dir {workdir} holds checkpoints of {was}; {now} never resumes them, so the "
        "two are never mixed. Use another --workdir, or --fresh (fit(..., fresh=True)) to move "
        "the old checkpoints aside and start over."
    )


def mark_run(workdir: Path, debug: bool) -> None:
    """Write (debug) or remove (normal) the ``DEBUG_RUN`` marker file."""
    marker = workdir / MARKER
    if debug:
        marker.write_text(
            "This run dir was written by a debug run (un-jitted steps); a normal run will not "
            "resume its checkpoints.\n"
        )
    elif marker.exists():
        marker.unlink()


def rerun_command(argv: list[str], step: int, workdir: str) -> str:
    """The command line that replays a failed checked run up to ``step`` in debug mode."""
    keep: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--check", "--debug", "--no-check", "--no-debug", "--fresh", "--no-fresh"):
            continue
        if arg in ("--steps", "--workdir"):
            skip_next = True
            continue
        if arg.startswith(("--steps=", "--workdir=")):
            continue
        keep.append(arg)
    debug_dir = f"{workdir.rstrip('/')}-debug"
    return " ".join([*keep, "--debug", "--fresh", "--steps", str(step), "--workdir", debug_dir])
