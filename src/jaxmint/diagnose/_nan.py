"""Localize a non-finite step: replay it from the last good checkpoint, checked."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxmint._tree import flat_with_names
from jaxmint.data import ArrayLoader
from jaxmint.diagnose._flow import nonfinite_origins
from jaxmint.run import RunDir
from jaxmint.state import TrainState
from jaxmint.steps import build_steps


def localize_nonfinite(run_dir: str | os.PathLike) -> str:
    """Re-run the step recorded in ``nonfinite.json`` and say where NaN/inf first appeared.

    The state of the newest checkpoint is restored read-only (nothing in the run
    dir changes), the steps up to the failing one are replayed (they are
    deterministic), and the failing step is evaluated equation by equation. The
    report names the operation where the NaN or inf that reaches the loss or the
    gradient was born (`nonfinite_origins`), not the first NaN or inf anywhere: an
    attention's intentional ``-inf`` mask is not a fault. The sown activations (by
    layer) and loss terms of that step are checked as well.
    """
    run = RunDir.of(run_dir)
    record = run.read_nonfinite()
    bad_step = int(record["step"])
    module, config, _ = run.load_experiment()
    exp = module.build(config)
    steps = build_steps(
        exp.model, exp.loss, exp.optimizer, input_key=exp.input_key, metrics=exp.metrics
    )
    if not isinstance(exp.train, Mapping):
        raise ValueError(
            f"the experiment of {run.path} reads its training data from a stream or files, "
            "whose batch at a step is not replayed here; replay the step with --replay-from "
            "(it continues the run from its checkpoint)"
        )
    loader = ArrayLoader(exp.train, config.batch_size, seed=config.seed)
    template = jax.eval_shape(steps.init, jax.random.PRNGKey(config.seed), next(loader.batches(0)))
    good = [s for s in run.checkpoint_steps() if s < bad_step]
    if good:
        start = max(good)
        state = TrainState(**run.read_state(start, template._asdict())[0])
    else:
        start = 0
        state = jax.jit(steps.init)(jax.random.PRNGKey(config.seed), next(loader.batches(0)))
    step = jax.jit(steps.train_step)
    batches = loader.batches(start)
    for _ in range(start + 1, bad_step):  # replay up to the step before the failing one
        state, _ = step(state, next(batches))
    batch = next(batches)

    lines = [f"replayed step {bad_step} from the checkpoint at step {start}"]
    lines += _origins(steps.train_step, state, batch)
    bad_inputs = [
        k
        for k, v in batch.items()
        if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()
    ]
    if bad_inputs:
        lines.append(f"the batch itself holds NaN/inf in {bad_inputs}")
    variables = {"params": state.params, **state.model_state}
    _, updates = exp.model.forward(
        variables, batch[exp.input_key], train=True, key=jax.random.fold_in(state.rng, state.step)
    )
    inter = dict(updates).get("intermediates", {})
    bad_acts = [
        name for name, x in flat_with_names(inter).items() if not bool(jnp.all(jnp.isfinite(x)))
    ]
    if bad_acts:
        lines.append(f"non-finite activations (layers): {bad_acts}")
    _, out = step(state, batch)
    terms = [
        k for k, v in jax.device_get(out).items() if k.startswith("loss/") and not np.isfinite(v)
    ]
    lines.append(
        f"non-finite loss terms: {terms or 'none'}; recorded at the time: "
        f"terms {record.get('terms')}, parameter groups {record.get('groups')}"
    )
    return "\n".join(lines)


def _origins(train_step, state, batch) -> list[str]:
    """Where the non-finite values reaching the step's loss, terms and gradient norm
    were born: the first is the fault, later ones are listed after it."""
    origins = nonfinite_origins(lambda s, b: train_step(s, b)[1], state, batch)
    if not origins:
        return ["no operation made the NaN or inf that reached the loss on replay"]
    lines = [f"the NaN/inf in the loss or gradient comes from: {origins[0].sentence()}"]
    lines += [f"  then also: {o.sentence()}" for o in origins[1:4]]
    return lines
