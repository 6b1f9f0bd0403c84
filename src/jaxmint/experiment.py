"""What every experiment script shares: the common config fields and its `main`.

An experiment is a plain script with a config dataclass (inheriting `Common`),
a ``build(config) -> Experiment`` function and a last line calling `main`::

    if __name__ == "__main__":
        jaxmint.experiment.main(build, Config, smoke=SMOKE)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import optax

from jaxmint.config import field, parse, to_dict
from jaxmint.losses import Loss
from jaxmint.models import Model


@dataclasses.dataclass
class Common:
    """Fields spelled the same in every experiment."""

    workdir: str = field("runs/experiment", "run directory (resumed if it holds checkpoints)")
    steps: int = field(1000, "optimizer steps to train for")
    batch_size: int = field(128, "global batch size")
    seed: int = field(0, "seed of initialization, shuffling and dropout")
    lr: float = field(1e-3, "peak learning rate")
    eval_every: int = field(250, "evaluate every N steps (and at the end)")
    checkpoint_every: int = field(250, "checkpoint every N steps (and at the end)")
    strategy: str = field("auto", "auto | single | data | fsdp | pmap (auto: data on >1 device)")
    log_every: int = field(50, "log metrics every N steps")
    grad_accum: int = field(1, "micro-batches per step (gradient accumulation)")
    compute_dtype: str | None = field(None, "e.g. bfloat16: compute dtype, float32 master params")
    nonfinite: str = field("raise", "raise | skip: what to do with a non-finite loss or gradient")
    fresh: bool = field(False, "move existing checkpoints in --workdir aside and start over")
    progress: bool = field(True, "show the live progress bar")
    coordinator: str | None = field(None, "multi-host: host:port of process 0 (else detected)")
    num_processes: int | None = field(None, "multi-host: number of processes")
    process_id: int | None = field(None, "multi-host: this process's index")
    debug: bool = field(False, "run steps un-jitted so print/breakpoint show real arrays")
    check: bool = field(False, "checkify each step: stop at the first NaN or bad index")
    summary: bool = field(False, "print the model's layers, shapes, sizes and FLOPs; no training")
    diagnose_every: int | None = field(
        100, "log gradient/activation diagnostics every N steps (none: off)"
    )


class Experiment(NamedTuple):
    """What ``build(config)`` returns: everything `fit` needs, and what export needs."""

    model: Model
    loss: Loss
    optimizer: optax.GradientTransformation
    train: Any
    eval: Mapping[str, Any] | None = None
    metrics: Mapping[str, Callable] | None = None
    input_key: str = "x"


def fit_experiment(
    exp: Experiment, config: Common, *, script: str | Path | None = None, **overrides
):
    """Run `jaxmint.fit` with the common fields of ``config``.

    ``script`` is the experiment file recorded in the run dir (for export and
    resume); by default the running program's main file.
    """
    from jaxmint.train import fit

    kwargs = dict(
        steps=config.steps,
        batch_size=config.batch_size,
        seed=config.seed,
        workdir=config.workdir,
        eval_data=exp.eval,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        strategy=config.strategy,
        nonfinite=config.nonfinite,
        metrics=exp.metrics,
        input_key=exp.input_key,
        grad_accum=config.grad_accum,
        compute_dtype=config.compute_dtype,
        log_every=config.log_every,
        config={
            **to_dict(config),
            "experiment": str(Path(script).resolve()) if script else _experiment_file(),
        },
        progress=config.progress,
        fresh=config.fresh,
        debug=config.debug,
        check=config.check,
        diagnose_every=config.diagnose_every,
    )
    kwargs.update(overrides)
    return fit(exp.model, exp.loss, exp.optimizer, exp.train, **kwargs)


def _experiment_file() -> str | None:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return str(Path(path).resolve()) if path else None


def main(
    build: Callable[[Any], Experiment],
    config_cls: type,
    argv: Sequence[str] | None = None,
    *,
    smoke: Mapping[str, Any] | None = None,
):
    """Parse the command line, build the experiment, train it and print the outcome."""
    config = parse(config_cls, argv, smoke=smoke)
    from jaxmint.train import initialize_distributed

    if config.summary:
        return _print_summary(build(config), config)
    initialize_distributed(config.coordinator, config.num_processes, config.process_id)
    exp = build(config)
    from jaxmint.checkpoint import CheckpointError
    from jaxmint.data import DataError
    from jaxmint.debug import CheckError
    from jaxmint.losses import LossError
    from jaxmint.train import NonFiniteError

    try:
        result = fit_experiment(exp, config)
    except (NonFiniteError, CheckpointError, DataError, LossError) as e:
        # Errors about the user's run or data: the message says what to do; no traceback.
        raise SystemExit(f"error: {e}") from e
    except CheckError as e:
        from jaxmint.debug import rerun_command

        argv = list(sys.argv[1:] if argv is None else argv)
        command = rerun_command([f"python {sys.argv[0]}", *argv], e.step, config.workdir)
        raise SystemExit(f"error: {e}\nRerun it in debug mode with:\n  {command}") from e
    import jax

    if jax.process_index() == 0:
        print(f"run dir: {Path(config.workdir).resolve()}")
        for key, value in sorted(result.final_eval.items()):
            print(f"  {key:<24} {value:.4f}")
    return result


def _print_summary(exp: Experiment, config: Common):
    """Print the model summary on one batch of the training data (``--summary``)."""
    from jaxmint.models import summary

    if isinstance(exp.train, Mapping):
        sample = {k: v[: config.batch_size] for k, v in exp.train.items()}
    else:
        sample = next(iter(exp.train))
    result = summary(exp.model, sample, input_key=exp.input_key, show=False)
    print(result)
    return result


def load_module(path: str | Path):
    """Import an experiment script by path (for export, sweeps and tests)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no experiment script at {path}")
    name = f"jaxmint_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for attr in ("Config", "build"):
        if not hasattr(module, attr):
            raise AttributeError(f"experiment {path} defines no {attr!r}")
    return module
