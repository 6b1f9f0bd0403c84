"""Hyper-parameter sweeps: Optuna studies, pull-based workers, submitit and Ray launchers.

An experiment script defines ``sweep() -> Spec`` next to ``build``; ``jaxmint sweep``
starts workers that pull trials from the study until the budget is spent. See
docs/sweeps.md.
"""

from jaxmint.sweep._launch import EXECUTORS as EXECUTORS
from jaxmint.sweep._launch import WorkerJob as WorkerJob
from jaxmint.sweep._launch import launch_local as launch_local
from jaxmint.sweep._launch import launch_ray as launch_ray
from jaxmint.sweep._launch import launch_slurm as launch_slurm
from jaxmint.sweep._launch import prepare as prepare
from jaxmint.sweep._launch import slurm_executor as slurm_executor
from jaxmint.sweep._launch import visible_devices as visible_devices
from jaxmint.sweep._launch import wait as wait
from jaxmint.sweep._launch import worker_env as worker_env
from jaxmint.sweep._report import report as report
from jaxmint.sweep._space import Categorical as Categorical
from jaxmint.sweep._space import Grid as Grid
from jaxmint.sweep._space import Int as Int
from jaxmint.sweep._space import LogUniform as LogUniform
from jaxmint.sweep._space import Spec as Spec
from jaxmint.sweep._space import SweepError as SweepError
from jaxmint.sweep._space import Uniform as Uniform
from jaxmint.sweep._study import open_study as open_study
from jaxmint.sweep._worker import run_worker as run_worker

__all__ = [
    "EXECUTORS",
    "Categorical",
    "Grid",
    "Int",
    "LogUniform",
    "Spec",
    "SweepError",
    "Uniform",
    "WorkerJob",
    "launch_local",
    "launch_ray",
    "launch_slurm",
    "open_study",
    "prepare",
    "report",
    "run_worker",
    "slurm_executor",
    "visible_devices",
    "wait",
    "worker_env",
]
