"""Hooks: user callbacks called by the fit loop, outside the jitted step."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Hook:
    """Subclass and override what you need; every method is a no-op by default."""

    def on_fit_start(self, state, start_step: int) -> None:
        """Called once before the first step (``start_step`` > 0 when resuming)."""

    def on_log(self, step: int, record: dict) -> None:
        """Called at each log step with the record written to ``metrics.jsonl``."""

    def on_fit_end(self, result) -> None:
        """Called once with the `FitResult`."""


class _FunctionHook(Hook):
    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_log(self, step: int, record: dict) -> None:
        self.fn(step, record)


def as_hooks(hooks: Sequence) -> list[Hook]:
    out = []
    for h in hooks:
        if isinstance(h, Hook):
            out.append(h)
        elif callable(h):
            out.append(_FunctionHook(h))
        else:
            raise TypeError(f"a hook must be a Hook or a callable (step, record), got {h!r}")
    return out
