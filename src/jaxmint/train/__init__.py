"""Training: the `fit` loop, its settings, and the hooks that drive it."""

from jaxmint.state import TrainState as TrainState
from jaxmint.steps import Steps as Steps
from jaxmint.steps import build_steps as build_steps
from jaxmint.train._builtin import Checkpointer as Checkpointer
from jaxmint.train._builtin import Diagnose as Diagnose
from jaxmint.train._builtin import NonFiniteError as NonFiniteError
from jaxmint.train._builtin import NonFiniteGuard as NonFiniteGuard
from jaxmint.train._builtin import Progress as Progress
from jaxmint.train._builtin import RecompileWatch as RecompileWatch
from jaxmint.train._builtin import Writers as Writers
from jaxmint.train._config import CheckpointSettings as CheckpointSettings
from jaxmint.train._config import DebugSettings as DebugSettings
from jaxmint.train._config import EvaluationSettings as EvaluationSettings
from jaxmint.train._config import FitConfig as FitConfig
from jaxmint.train._config import LoggingSettings as LoggingSettings
from jaxmint.train._config import TrainingSettings as TrainingSettings
from jaxmint.train._distributed import initialize as initialize_distributed
from jaxmint.train._experiment import Experiment as Experiment
from jaxmint.train._experiment import fit_experiment as fit_experiment
from jaxmint.train._fit import FitLoop as FitLoop
from jaxmint.train._fit import fit as fit
from jaxmint.train._hooks import FitResult as FitResult
from jaxmint.train._hooks import Hook as Hook
from jaxmint.train._hooks import without as without
from jaxmint.train._modes import CheckError as CheckError
from jaxmint.train._modes import is_concrete as is_concrete
from jaxmint.train._parallel import DEFAULT_RULES as DEFAULT_RULES
from jaxmint.train._parallel import MeshError as MeshError
from jaxmint.train._setup import plan_sharding as plan_sharding

__all__ = [
    "DEFAULT_RULES",
    "CheckError",
    "CheckpointSettings",
    "Checkpointer",
    "DebugSettings",
    "Diagnose",
    "EvaluationSettings",
    "Experiment",
    "FitConfig",
    "FitLoop",
    "FitResult",
    "Hook",
    "LoggingSettings",
    "MeshError",
    "NonFiniteError",
    "NonFiniteGuard",
    "Progress",
    "RecompileWatch",
    "Steps",
    "TrainState",
    "TrainingSettings",
    "Writers",
    "build_steps",
    "fit",
    "fit_experiment",
    "initialize_distributed",
    "is_concrete",
    "plan_sharding",
    "without",
]
