"""Export a run directory: rebuild its experiment's model, load a checkpoint, export."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxmint.export._artifact import DEFAULT_BATCH_SIZES, config_hash, export_model
from jaxmint.export._lower import ExportError


def load_experiment(run_dir: str | os.PathLike):
    """``(module, config, experiment)`` of the experiment script a run dir recorded."""
    from jaxmint.config import from_dict
    from jaxmint.experiment import load_module

    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run dir: it has no config.json")
    recorded = json.loads(path.read_text()).get("config", {})
    script = recorded.get("experiment")
    if not script:
        raise ExportError(
            f"{path} records no experiment script (the run was not started from one); export "
            "from Python with jaxmint.export.export_model(model, variables, sample, out, ...)"
        )
    if not Path(script).is_file():
        raise ExportError(f"the run's experiment script {script} no longer exists")
    module = load_module(script)
    config = from_dict(module.Config, recorded)
    return module, config, recorded


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | str | None = None,
    targets: str | Sequence[str] = ("xla",),
    platforms: Sequence[str] = ("cpu",),
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    fixed_batch: bool = False,
    precompile: bool = True,
    force: bool = False,
    **target_options,
) -> Path:
    """Export the model of a run dir at its latest step, a given ``step``, or ``"best"``.

    The experiment script recorded in ``config.json`` rebuilds the same model
    (``build(config)``); its weights come from the checkpoint. ``targets`` and
    ``target_options`` (``onnx_opset``, ``iree_cpu``, ``iree_hal_targets``) are
    those of `export_model`.
    """
    from jaxmint.checkpoint import load_params

    module, config, recorded = load_experiment(run_dir)
    exp = module.build(config)
    weights, chosen = load_params(run_dir, step)
    variables = {"params": weights["params"], **(weights["model_state"] or {})}
    sample = _sample(exp.train, exp.input_key)
    return export_model(
        exp.model,
        variables,
        sample,
        out,
        name=Path(recorded["experiment"]).stem,
        input_key=exp.input_key,
        targets=targets,
        platforms=platforms,
        batch_sizes=batch_sizes,
        fixed_batch=fixed_batch,
        precompile=precompile,
        force=force,
        experiment={
            "name": Path(recorded["experiment"]).stem,
            "config_hash": config_hash(recorded),
            "step": chosen,
        },
        **target_options,
    )


def _sample(train, input_key: str, n: int = 16) -> np.ndarray:
    if isinstance(train, Mapping):
        return np.asarray(train[input_key][:n])
    first = next(iter(train))
    return np.asarray(first[input_key][:n])
