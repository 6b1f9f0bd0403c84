"""Hooks: what the fit loop calls, on the host, at the moments that matter.

Everything `fit` does besides stepping — checkpoints, metric writers, the progress
bar, diagnosis, the non-finite report, the recompile watch — is a hook, written
with the same public methods a user's hook has. Each method receives the
`FitLoop` (the settings, the run dir, ``evaluate``, ``request_log``) and what
is known at that moment.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxmint.state import TrainState
    from jaxmint.train._fit import FitLoop


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      params: the final trained parameters (on the host, as numpy).
      state: the final `TrainState` (on device).
      history: the logged records, the same dicts that are in ``metrics.jsonl``.
      workdir: the run directory, or None.
      stopped: why a hook ended the run early (`FitLoop.request_stop`), or None.
    """

    params: Any
    state: TrainState
    history: list[dict]
    workdir: Path | None
    stopped: str | None = None

    @property
    def final_eval(self) -> dict:
        """The last logged ``eval/*`` metrics."""
        for record in reversed(self.history):
            evals = {k: v for k, v in record.items() if k.startswith("eval/")}
            if evals:
                return evals
        return {}


class Hook:
    """Subclass and override what you need; every method is a no-op by default.

    Called in this order: `on_start` once; then per step `on_step`; on a log step
    `on_eval` (if it evaluates) and `on_log`; on a checkpoint step `on_checkpoint`;
    and `on_end` once, also when the run fails (then ``result`` is None). Hooks run
    in the order given, after the built-in ones that compute (diagnosis) and before
    the ones that write (checkpoints, writers, progress bar), so a hook can add
    entries to a record before it is written.
    """

    def on_start(self, loop: FitLoop, state: TrainState) -> None:
        """Once, before the first step; ``loop.start_step > 0`` when resuming."""

    def on_step(self, loop: FitLoop, step: int, state: TrainState, batch: Any, out: dict) -> None:
        """After every step. ``out`` holds device arrays: reading them waits for the step."""

    def on_eval(self, loop: FitLoop, step: int, state: TrainState, record: dict) -> None:
        """After an evaluation; ``record`` already holds the ``eval/*`` metrics; add more."""

    def on_log(self, loop: FitLoop, step: int, state: TrainState, batch: Any, record: dict) -> None:
        """At each log step, with the record about to be written to ``metrics.jsonl``."""

    def on_checkpoint(self, loop: FitLoop, step: int, state: TrainState) -> None:
        """When the loop checkpoints: every ``checkpoint_every`` steps, at the end
        (``loop.final``) and on preemption (``loop.stop``)."""

    def on_end(self, loop: FitLoop, result: FitResult | None) -> None:
        """Once, last; ``result`` is None when the run stopped with an error."""


class _FunctionHook(Hook):
    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_log(self, loop, step, state, batch, record) -> None:
        self.fn(step, record)


class _LegacyHook(Hook):
    """A hook written against the first protocol: ``on_fit_start(state, start_step)``,
    ``on_log(step, record)`` and ``on_fit_end(result)``; it keeps working."""

    def __init__(self, hook):
        self.hook = hook

    def on_start(self, loop, state) -> None:
        if hasattr(self.hook, "on_fit_start"):
            self.hook.on_fit_start(state, loop.start_step)

    def on_log(self, loop, step, state, batch, record) -> None:
        if _takes_two(getattr(self.hook, "on_log", None)):
            self.hook.on_log(step, record)

    def on_end(self, loop, result) -> None:
        if hasattr(self.hook, "on_fit_end") and result is not None:
            self.hook.on_fit_end(result)


def _takes_two(method) -> bool:
    """Whether ``method`` is the first protocol's ``on_log(step, record)``."""
    if method is None:
        return False
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 2


def _is_legacy(hook) -> bool:
    return (
        hasattr(hook, "on_fit_start")
        or hasattr(hook, "on_fit_end")
        or (overrides(hook, "on_log") and _takes_two(hook.on_log))
    )


class Without:
    """Built-in hooks to leave out of a run: ``fit(..., hooks=[without(Progress)])``."""

    def __init__(self, *classes: type):
        for c in classes:
            if not (isinstance(c, type) and issubclass(c, Hook)):
                raise TypeError(f"without() takes hook classes, got {c!r}")
        self.classes = classes


def without(*classes: type) -> Without:
    """Leave the built-in hooks of these classes out of a `fit` run.

    Example::

        from jaxmint.train import Progress, RecompileWatch, without
        jaxmint.fit(..., hooks=[without(Progress, RecompileWatch)])
    """
    return Without(*classes)


def as_hooks(hooks: Sequence) -> list[Hook]:
    """``hooks`` as `Hook` objects: a callable ``(step, record)`` is called at each log."""
    out = []
    for h in hooks:
        if isinstance(h, Without):
            out.append(h)
        elif isinstance(h, Hook):
            out.append(_LegacyHook(h) if _is_legacy(h) else h)
        elif isinstance(h, type) and issubclass(h, Hook):
            raise TypeError(f"pass an instance of the hook class {h.__name__}, not the class")
        elif callable(h):
            out.append(_FunctionHook(h))
        else:
            raise TypeError(f"a hook must be a Hook or a callable (step, record), got {h!r}")
    return out


def overrides(hook: Hook, method: str) -> bool:
    """Whether ``hook`` overrides ``method`` (the loop skips calls that do nothing)."""
    return getattr(type(hook), method) is not getattr(Hook, method)
