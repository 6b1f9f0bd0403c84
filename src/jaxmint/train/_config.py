"""`FitConfig`: every setting of `jaxmint.fit`, as one dataclass built from groups.

An experiment's config extends it (`jaxmint.experiment.Common`), so its fields
are command-line flags and reach `fit` as they are, with nothing copied by hand.
"""

from __future__ import annotations

import dataclasses
import os.path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxmint.config import field
from jaxmint.train._compiled import cache_folder
from jaxmint.train._parallel import mesh_text, parse_mesh

STRATEGIES = ("auto", "single", "data", "fsdp", "pmap")
NONFINITE = ("raise", "skip")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class TrainingSettings:
    """What each step computes and how it is spread over devices."""

    steps: int = field(1000, "optimizer steps to train for", run_control=True)
    batch_size: int = field(128, "global batch size")
    seed: int = field(0, "seed of initialization, shuffling and dropout")
    strategy: str = field(
        "auto", "auto | single | data | fsdp | pmap (auto: data on >1 device)", run_control=True
    )
    mesh: str | None = field(
        None,
        "a device mesh, e.g. data=-1,fsdp=2 (-1: the rest of the devices), instead of --strategy",
        run_control=True,
    )
    nonfinite: str = field("raise", "raise | skip: what to do with a non-finite loss or gradient")
    grad_accum: int = field(1, "micro-batches per step (gradient accumulation)")
    compute_dtype: str | None = field(None, "e.g. bfloat16: compute dtype, float32 master params")
    prefetch: int = field(2, "batches prefetched to accelerators", run_control=True)
    data_workers: int = field(
        0,
        "worker processes that read a record source (0: threads of this process)",
        run_control=True,
    )
    compile_cache: str | None = field(
        None,
        "a folder for JAX's persistent compilation cache: a rerun, a resume or a replay of the "
        "same program loads its executables instead of compiling them",
        run_control=True,
    )


@dataclasses.dataclass
class EvaluationSettings:
    """When and how the eval data is evaluated."""

    eval_every: int | None = field(
        None, "evaluate every N steps (and at the end)", run_control=True
    )
    eval_batch_size: int | None = field(
        None, "evaluation batch size (default: --batch-size)", run_control=True
    )


@dataclasses.dataclass
class CheckpointSettings:
    """The run directory and its checkpoints: cadence and keep policy."""

    workdir: str | None = field(
        None, "run directory (resumed if it holds checkpoints)", run_control=True
    )
    checkpoint_every: int | None = field(
        None, "checkpoint every N steps (and at the end)", run_control=True
    )
    keep_last: int = field(2, "checkpoints kept: the last N ...", run_control=True)
    keep_best: int = field(0, "... plus the best N by --best-metric", run_control=True)
    best_metric: str = field("eval/loss", "the metric that ranks checkpoints", run_control=True)
    best_mode: str = field("min", "min | max: which --best-metric is best", run_control=True)
    fresh: bool = field(
        False, "move existing checkpoints in --workdir aside and start over", run_control=True
    )


@dataclasses.dataclass
class LoggingSettings:
    """What is logged and shown, and how often."""

    log_every: int = field(50, "log metrics every N steps (and the first)", run_control=True)
    progress: bool = field(True, "show the live progress bar", run_control=True)
    diagnose_every: int | None = field(
        None, "log gradient/activation diagnostics every N steps (none: off)", run_control=True
    )


@dataclasses.dataclass
class DebugSettings:
    """Debug and checked modes, and replaying a step of another run."""

    debug: bool = field(False, "run steps un-jitted so print/breakpoint show real arrays")
    check: bool = field(False, "checkify each step: stop at the first NaN or bad index")
    stop_after: int | None = field(
        None, "stop after this step; schedules still follow --steps", run_control=True
    )
    replay_from: str | None = field(
        None,
        "start from another run dir's newest checkpoint before --stop-after (it is only read): "
        "replays a failed step with the same config",
        run_control=True,
    )


@dataclasses.dataclass
class FitConfig(
    DebugSettings, LoggingSettings, CheckpointSettings, EvaluationSettings, TrainingSettings
):
    """The settings of a training run (see the training guide for each), in groups.

    Each group is a dataclass of its own (`TrainingSettings`, `EvaluationSettings`,
    `CheckpointSettings`, `LoggingSettings`, `DebugSettings`); `FitConfig` has all
    their fields, flat, so ``fit(..., steps=..., keep_last=...)``
    and an experiment's ``--flags`` name them directly, and ``settings.part(Group)``
    gives one group (what a hook about checkpoints needs, for example).
    """

    def part(self, group: type):
        """The fields of ``group`` (one of the settings dataclasses) as that dataclass."""
        return group(**{f.name: getattr(self, f.name) for f in dataclasses.fields(group)})

    def check_values(self) -> None:
        """Raise `ValueError` naming the first bad setting and what is allowed."""
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            _positive(name, getattr(self, name), optional=False)
        for name in (
            "eval_every",
            "checkpoint_every",
            "diagnose_every",
            "eval_batch_size",
            "stop_after",
        ):
            _positive(name, getattr(self, name), optional=True)
        if self.stop_after is not None and self.stop_after > self.steps:
            raise ValueError(f"stop_after={self.stop_after} is past steps={self.steps}")
        if self.replay_from is not None and self.stop_after is None:
            raise ValueError("replay_from needs stop_after: the step to replay")
        if not isinstance(self.seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name, choices in (
            ("strategy", STRATEGIES),
            ("nonfinite", NONFINITE),
            ("best_mode", ("min", "max")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}")
        if self.mesh is not None:
            parse_mesh(self.mesh)  # its fit to the devices is checked by fit, before compiling
            if self.strategy != "auto":
                raise ValueError(
                    f"give mesh or strategy, not both (mesh={self.mesh!r}, strategy="
                    f"{self.strategy!r}); strategy 'data' is the mesh data=-1, 'fsdp' fsdp=-1"
                )
        if self.compute_dtype is not None and _dtype_name(self.compute_dtype) not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype={self.compute_dtype!r} is not one of {COMPUTE_DTYPES} (or None)"
            )
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be at least 0, got {self.data_workers}")
        if self.keep_last < 1 or self.keep_best < 0 or self.prefetch < 0:
            raise ValueError(
                "keep_last must be at least 1, keep_best and prefetch at least 0; got "
                f"{self.keep_last}, {self.keep_best}, {self.prefetch}"
            )
        if self.batch_size % self.grad_accum:
            divisors = [d for d in range(1, self.batch_size + 1) if not self.batch_size % d]
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                f"choose grad_accum among {divisors}"
            )
        if self.compile_cache is not None:
            path = cache_folder(self.compile_cache)
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(
                    f"compile_cache={path} is a file: give a folder for compiled programs"
                )
        if self.debug and self.check:
            raise ValueError(
                "debug=True and check=True are exclusive: check first to find the failing step, "
                "then rerun up to that step with debug=True to look at it"
            )

    def record(self) -> dict[str, Any]:
        """These settings as JSON-ready values (what ``config.json`` keeps under ``fit``)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(FitConfig)}


FIT_FIELDS = frozenset(f.name for f in dataclasses.fields(FitConfig))


def resolve_settings(config: Any, settings: dict[str, Any]) -> FitConfig:
    """The `FitConfig` of a `fit` call: ``config``'s fit fields, then ``settings`` on top."""
    unknown = sorted(set(settings) - FIT_FIELDS)
    if unknown:
        raise TypeError(
            f"fit() got unknown settings {unknown}; the settings are {sorted(FIT_FIELDS)}"
        )
    base = {}
    if isinstance(config, FitConfig):
        base = {name: getattr(config, name) for name in FIT_FIELDS}
    elif "steps" not in settings or "batch_size" not in settings:
        missing = [k for k in ("steps", "batch_size") if k not in settings]
        raise TypeError(f"fit() needs {' and '.join(f'{k}=' for k in missing)} (or a FitConfig)")
    merged = FitConfig(**{**base, **settings})
    merged.check_values()
    if merged.compute_dtype is not None:
        merged.compute_dtype = _dtype_name(merged.compute_dtype)
    if merged.mesh is not None:
        merged.mesh = mesh_text(parse_mesh(merged.mesh))
    return merged


def _dtype_name(dtype) -> str | None:
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return None


def _positive(name: str, value, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        kind = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _plain(value):
    return None if value is None else value if isinstance(value, int | float | str) else str(value)
