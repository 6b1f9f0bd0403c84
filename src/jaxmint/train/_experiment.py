"""An experiment as `fit` sees it: what ``build(config)`` returns, and how it is trained."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import optax

from jaxmint.losses import Loss
from jaxmint.models import Model
from jaxmint.run import RunDir
from jaxmint.train._config import FitConfig
from jaxmint.train._fit import fit
from jaxmint.train._hooks import FitResult


class Experiment(NamedTuple):
    """What ``build(config)`` returns: everything `fit` needs, and what export needs."""

    model: Model
    loss: Loss
    optimizer: optax.GradientTransformation
    train: Any
    eval: Mapping[str, Any] | None = None
    metrics: Mapping[str, Callable] | None = None
    input_key: str = "x"
    labels: Sequence[str] | None = None  # class names of the output, exported as labels.txt


def fit_experiment(
    exp: Experiment, config: FitConfig, *, script: str | Path | None = None, **overrides
) -> FitResult:
    """Train ``exp`` with the settings of ``config`` (a `FitConfig`, such as an experiment's).

    ``config`` is recorded in the run dir with ``script``, the experiment file that
    export, diagnosis and resume rebuild it from (default: the running program's
    main file). Keyword ``overrides`` are `fit` settings that win over ``config``.
    """
    script = str(Path(script).resolve()) if script else _main_file()
    workdir = overrides.pop("workdir", config.workdir)
    return fit(
        exp.model,
        exp.loss,
        exp.optimizer,
        exp.train,
        eval_data=exp.eval,
        metrics=exp.metrics,
        input_key=exp.input_key,
        config=config,
        workdir=None if workdir is None else RunDir(workdir, experiment=script),
        **overrides,
    )


def _main_file() -> str | None:
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return str(Path(path).resolve()) if path else None
