"""What every experiment script shares: the common config fields and its `main`.

An experiment is a plain script with a config dataclass (inheriting `Common`),
a ``build(config) -> Experiment`` function and a last line calling `main`::

    if __name__ == "__main__":
        jaxmint.experiment.main(build, Config, smoke=SMOKE)
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxmint.checkpoint import CheckpointError
from jaxmint.config import field, parse
from jaxmint.data import DataError, first_examples
from jaxmint.debug import CheckError, rerun_command
from jaxmint.losses import LossError
from jaxmint.models import summary
from jaxmint.run import load_module as load_module
from jaxmint.train import (
    Experiment,
    FitConfig,
    MeshError,
    NonFiniteError,
    fit_experiment,
    initialize_distributed,
)

__all__ = ["Common", "Experiment", "fit_experiment", "load_module", "main"]


@dataclasses.dataclass
class Common(FitConfig):
    """The fields spelled the same in every experiment: `FitConfig`'s, with defaults for
    scripts, plus the learning rate, multi-host flags and ``--summary``."""

    workdir: str = field(
        "runs/experiment", "run directory (resumed if it holds checkpoints)", run_control=True
    )
    eval_every: int | None = field(250, "evaluate every N steps (and at the end)", run_control=True)
    checkpoint_every: int | None = field(
        250, "checkpoint every N steps (and at the end)", run_control=True
    )
    diagnose_every: int | None = field(
        100, "log gradient/activation diagnostics every N steps (none: off)", run_control=True
    )
    lr: float = field(1e-3, "peak learning rate")
    coordinator: str | None = field(
        None, "multi-host: host:port of process 0 (else detected)", run_control=True
    )
    num_processes: int | None = field(None, "multi-host: number of processes", run_control=True)
    process_id: int | None = field(None, "multi-host: this process's index", run_control=True)
    summary: bool = field(
        False, "print the model's layers, shapes, sizes and FLOPs; no training", run_control=True
    )


def main(
    build: Callable[[Any], Experiment],
    config_cls: type,
    argv: Sequence[str] | None = None,
    *,
    smoke: Mapping[str, Any] | None = None,
):
    """Parse the command line, build the experiment, train it and print the outcome."""
    config = parse(config_cls, argv, smoke=smoke)
    try:
        if config.summary:
            return _print_summary(build(config), config)
        initialize_distributed(config.coordinator, config.num_processes, config.process_id)
        result = fit_experiment(build(config), config)
    except (NonFiniteError, CheckpointError, DataError, LossError, MeshError) as e:
        # Errors about the user's run or data: the message says what to do; no traceback.
        raise SystemExit(f"error: {e}") from e
    except CheckError as e:
        argv = list(sys.argv[1:] if argv is None else argv)
        command = rerun_command([f"python {sys.argv[0]}", *argv], e.step, config.workdir)
        raise SystemExit(
            f"error: {e}\nReplay step {e.step} in debug mode (un-jitted, from the newest "
            f"checkpoint before it, with the same config and schedules) with:\n  {command}"
        ) from e
    if jax.process_index() == 0:
        print(f"run dir: {Path(config.workdir).resolve()}")
        for key, value in sorted(result.final_eval.items()):
            print(f"  {key:<24} {value:.4f}")
    return result


def _print_summary(exp: Experiment, config: Common):
    """Print the model summary on one batch of the training data (``--summary``)."""
    sample = first_examples(exp.train, config.batch_size)
    result = summary(exp.model, sample, input_key=exp.input_key, show=False)
    print(result)
    return result
