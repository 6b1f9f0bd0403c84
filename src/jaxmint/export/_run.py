"""Export a run directory: rebuild its experiment's model, load a checkpoint, export."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmint.data import first_examples
from jaxmint.export._artifact import DEFAULT_BATCH_SIZES, config_hash, export_model
from jaxmint.export._lower import ExportError
from jaxmint.export._quantize import CALIBRATION_EXAMPLES, STATIC
from jaxmint.run import RunDir, RunDirError


def load_experiment(run_dir: str | os.PathLike):
    """``(module, config, recorded)`` of the experiment script a run dir recorded.

    Kept for existing scripts; `jaxmint.run.RunDir.load_experiment` is the owner.
    """
    try:
        return RunDir.of(run_dir).load_experiment()
    except RunDirError as e:  # for export, an unusable run dir is an export error
        raise ExportError(str(e)) from None


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
    replace: bool = False,
    labels: Sequence[str] | None = None,
    quantize: str = "none",
    max_metric_drop: float = 0.5,
    **target_options,
) -> Path:
    """Export the model of a run dir at its latest step, a given ``step``, or ``"best"``.

    The experiment script recorded in ``config.json`` rebuilds the same model
    (``build(config)``); its weights come from the checkpoint. ``targets`` and
    ``target_options`` (``onnx_opset``, ``iree_cpu``, ``iree_hal_targets``) are
    those of `export_model`. ``labels`` (class names for the output) default to the
    experiment's ``labels``. A ``quantize``d export is judged on the experiment's
    eval data (see `export_model`); ``"int8"`` is calibrated on the first 256
    examples of its training data.
    """
    run = RunDir.of(run_dir)
    module, config, recorded = load_experiment(run)
    exp = module.build(config)
    weights, chosen = run.load_params(step)
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
        replace=replace,
        labels=exp.labels if labels is None else labels,
        quantize=quantize,
        eval_data=exp.eval,
        max_metric_drop=max_metric_drop,
        calibration_data=(
            _sample(exp.train, exp.input_key, CALIBRATION_EXAMPLES) if quantize == STATIC else None
        ),
        calibration_source="train",
        experiment={
            "name": Path(recorded["experiment"]).stem,
            "config_hash": config_hash(recorded),
            "step": chosen,
        },
        **target_options,
    )


def _sample(train, input_key: str, n: int = 16) -> np.ndarray:
    return first_examples(train, n)[input_key]
