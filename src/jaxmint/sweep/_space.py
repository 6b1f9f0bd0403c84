"""Search spaces: what a sweep varies, and how a trial's values become a config."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from jaxmint.config import from_dict, to_dict

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "asha", "hyperband", "none")


class SweepError(ValueError):
    """A sweep definition or sweep directory is not usable as given."""


@dataclasses.dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly from ``[low, high]``."""

    low: float
    high: float

    def suggest(self, trial, name: str):
        return trial.suggest_float(name, self.low, self.high)


@dataclasses.dataclass(frozen=True)
class LogUniform:
    """A positive float drawn uniformly in log space from ``[low, high]`` (learning rates)."""

    low: float
    high: float

    def suggest(self, trial, name: str):
        return trial.suggest_float(name, self.low, self.high, log=True)


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer from ``[low, high]`` (both included), optionally on a log scale."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def suggest(self, trial, name: str):
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)


def _encode(value):
    # Optuna's categorical choices are None/bool/int/float/str; tuples (layer widths)
    # travel as JSON text and are decoded before they reach the config.
    return value if value is None or isinstance(value, bool | int | float | str) else _json(value)


def _json(value) -> str:
    return "json:" + json.dumps(list(value) if isinstance(value, tuple) else value)


def decode(value):
    """The config value of a stored parameter (inverse of the categorical encoding)."""
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    return value


@dataclasses.dataclass(frozen=True)
class Categorical:
    """One of ``choices`` (numbers, strings, booleans or tuples such as layer widths)."""

    choices: Sequence[Any]

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        if not self.choices:
            raise SweepError("Categorical needs at least one choice")

    def suggest(self, trial, name: str):
        return decode(trial.suggest_categorical(name, [_encode(c) for c in self.choices]))

    def grid(self) -> list:
        return [_encode(c) for c in self.choices]


class Grid(Categorical):
    """Every one of ``values`` is tried (with ``sampler="grid"``); a categorical otherwise."""


Distribution = Uniform | LogUniform | Int | Categorical


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a sweep searches, what it optimizes and how.

    Example::

        Spec(space={"lr": LogUniform(1e-4, 1e-1), "hidden": Categorical([(64,), (256, 256)])},
             objective="eval/accuracy", direction="maximize", trials=16)

    Args:
      space: config field name -> distribution; any field of the config can be swept.
      objective: a key logged by `fit` (e.g. ``eval/accuracy``, ``eval/loss``); its value
        at each log step is reported for pruning, its last value is the trial's result.
      trials: the budget: how many trials the sweep runs in all (pruned and failed
        ones included). ``None`` with ``sampler="grid"`` means the size of the grid.
      sampler: ``tpe``, ``random`` or ``grid``; ``sampler_options`` go to its constructor.
      pruner: ``median``, ``asha`` (successive halving), ``hyperband`` or ``none``.
      seed: seeds the sampler (worker ``i`` uses ``seed + i``).
    """

    space: Mapping[str, Distribution]
    objective: str = "eval/loss"
    direction: str = "minimize"
    trials: int | None = 16
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pruner_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.space:
            raise SweepError("the sweep space is empty; name at least one config field to vary")
        for name, dist in self.space.items():
            if not isinstance(dist, Uniform | LogUniform | Int | Categorical):
                raise SweepError(
                    f"space[{name!r}] is {dist!r}; use Uniform, LogUniform, Int, Categorical "
                    "or Grid from jaxmint.sweep"
                )
            if isinstance(dist, Uniform | LogUniform | Int) and not dist.low <= dist.high:
                raise SweepError(f"space[{name!r}] has low > high: {dist!r}")
            if isinstance(dist, LogUniform) and dist.low <= 0:
                raise SweepError(f"space[{name!r}] is log-uniform but low={dist.low} is not > 0")
        if self.direction not in ("minimize", "maximize"):
            raise SweepError(f"direction={self.direction!r}; use 'minimize' or 'maximize'")
        if self.sampler not in SAMPLERS:
            raise SweepError(f"sampler={self.sampler!r} is not one of {SAMPLERS}")
        if self.pruner not in PRUNERS:
            raise SweepError(f"pruner={self.pruner!r} is not one of {PRUNERS}")
        if self.sampler == "grid":
            bad = [n for n, d in self.space.items() if not isinstance(d, Categorical)]
            if bad:
                raise SweepError(
                    f"sampler='grid' needs a finite set of values for every parameter, but "
                    f"{bad} are continuous; make them Grid([...]) or use sampler='tpe'"
                )
        if self.trials is None and self.sampler != "grid":
            raise SweepError("trials=None (the whole grid) needs sampler='grid'; give a number")
        if self.trials is not None and self.trials < 1:
            raise SweepError(f"trials must be a positive number, got {self.trials}")

    def grid(self) -> dict[str, list]:
        """The grid sampler's search space (encoded values)."""
        return {n: d.grid() for n, d in self.space.items()}

    def grid_size(self) -> int:
        return math.prod(len(d.choices) for d in self.space.values())

    @property
    def budget(self) -> int:
        return self.trials if self.trials is not None else self.grid_size()

    def describe(self) -> dict:
        """A JSON-ready description (saved in the sweep dir to detect a changed sweep)."""
        return {
            "space": {n: repr(d) for n, d in self.space.items()},
            "objective": self.objective,
            "direction": self.direction,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "seed": self.seed,
        }

    def check_fields(self, config_cls) -> None:
        """Raise if the space names a field the experiment's config does not have."""
        names = [f.name for f in dataclasses.fields(config_cls)]
        unknown = [n for n in self.space if n not in names]
        if unknown:
            raise SweepError(
                f"the sweep space names {unknown}, which are not fields of "
                f"{config_cls.__name__}; its fields are {names}"
            )


def suggest(trial, spec: Spec) -> dict[str, Any]:
    """Draw every parameter of ``spec`` for an Optuna ``trial``; returns config values."""
    return {name: dist.suggest(trial, name) for name, dist in spec.space.items()}


def apply(config, params: Mapping[str, Any], **fields):
    """``config`` with ``params`` (and ``fields``) set, tuples restored from JSON lists."""
    values = to_dict(config)
    values.update({k: decode(v) for k, v in params.items()})
    values.update(fields)
    return from_dict(type(config), values)
