"""`inspect_step`: one train step taken apart, as numpy, for poking in a REPL."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmint.data import ArrayLoader
from jaxmint.diagnose import describe, find_flags
from jaxmint.losses import Loss, LossInputs
from jaxmint.models._model import Model, join_variables, split_variables
from jaxmint.models._summary import _path
from jaxmint.run import RunDir
from jaxmint.state import group_leaves, param_groups
from jaxmint.steps import activation_stats, build_steps


@dataclasses.dataclass
class StepInspection:
    """What `inspect_step` returns, all numpy; ``str()`` of it is a readable table.

    Attributes:
      outputs: the model's outputs on the batch (train mode).
      intermediates: every sown intermediate (flax ``sow``), as a nested dict.
      terms: each named term and named combination's value, by name (as logged in
        ``loss/<name>``, before any weight).
      weights: the weight of each weighted term (``weight/<name>``).
      total: the total loss.
      grad_norms: ``{term name or "total": {layer: gradient norm}}``, one backward
        pass per term, per top-level parameter group.
      grads: the gradient of the total, shaped like the params.
      update: what the optimizer would add to the params (optax ``update`` on
        ``grads``), shaped like the params.
      update_norms: ``{layer: norm of the update}``.
      flags: the verdict in plain words: the flags of ``jaxmint diagnose`` that one
        step can show (update ratio, dominant term or regularizer, vanishing gradient,
        dead or saturated units), the likely cause first.
    """

    outputs: Any
    intermediates: dict
    terms: dict[str, float]
    weights: dict[str, float]
    total: float
    grad_norms: dict[str, dict[str, float]]
    grads: Any
    update: Any
    update_norms: dict[str, float]
    flags: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        layers = list(self.update_norms)
        header = ("loss", "value", *(f"|grad| {g}" for g in layers))
        rows = [header]
        for name in [*self.terms, "total"]:
            value = self.total if name == "total" else self.terms[name]
            weight = f" (x{self.weights[name]:.3g})" if name in self.weights else ""
            norms = self.grad_norms.get(name, {})
            rows.append(
                (f"{name}{weight}", f"{value:.6g}", *(f"{norms.get(g, 0.0):.4g}" for g in layers))
            )
        rows.append(("|update|", "", *(f"{self.update_norms[g]:.4g}" for g in layers)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        shapes = ", ".join(
            f"{_path(p)} {tuple(np.shape(v))}"
            for p, v in jax.tree_util.tree_flatten_with_path(self.intermediates)[0]
        )
        out = jax.tree_util.tree_map(np.shape, self.outputs)
        lines += ["", f"outputs {out}", f"intermediates {shapes or 'none'}", ""]
        lines += ["verdict:", *(f"  {line}" for line in describe(self.flags))]
        return "\n".join(lines)


def inspect_step(
    model: Model,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    batch: Mapping[str, Any],
    params: Any = None,
    *,
    key: jax.Array | None = None,
    model_state: Mapping[str, Any] | None = None,
    opt_state: Any = None,
    loss_state: Mapping[str, Any] | None = None,
    step: int = 0,
    input_key: str = "x",
) -> StepInspection:
    """Take one train step apart: outputs, intermediates, terms, per-term gradients, update.

    Runs eagerly (no jit), in train mode, in float32. Nothing is changed: the
    update is what the optimizer *would* apply.

    Args:
      params: the model's params; None initializes them from ``key``.
      key: the dropout key of the forward pass (and the init key when ``params``
        is None); default ``PRNGKey(0)``.
      model_state: the model's other collections (e.g. ``batch_stats``); default:
        freshly initialized.
      opt_state: the optimizer's state; default ``optimizer.init(params)``, so for
        Adam the update is that of a first step (and a warmup from 0 gives none).
      loss_state: the loss's ``{"weights", "params"}`` (learnable weights as trained);
        default ``loss.init()``.
      step: the step at which schedule weights of the loss are evaluated.

    Example::

        report = jaxmint.debug.inspect_step(model, loss, optax.sgd(0.1), batch)
        print(report)                      # a table
        report.grad_norms["hinge"]         # {layer: norm} of that term's gradient
    """
    if not isinstance(batch, Mapping) or input_key not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"inspect_step needs a batch dict holding the model input {input_key!r}; got {keys}"
        )
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    key = jax.random.PRNGKey(0) if key is None else key
    if params is None or model_state is None:
        init_params, init_state = split_variables(model.init(key, batch[input_key]))
        params = init_params if params is None else params
        model_state = init_state if model_state is None else model_state
    params = jax.tree_util.tree_map(jnp.asarray, params)
    model_state = None if model_state is None else dict(model_state)
    if loss_state is None:
        loss_state = loss.init()
    else:  # (a train state's loss state also holds the optimizer state of its params)
        loss_state = {"weights": loss_state["weights"], "params": loss_state["params"]}
    names = loss.metric_names()

    def evaluate(p):
        variables = join_variables(p, model_state)
        outputs, updates = model.forward(variables, batch[input_key], train=True, key=key)
        intermediates = dict(updates).get("intermediates", {})
        inputs = LossInputs(outputs, batch, p, intermediates, jnp.asarray(step, jnp.int32))
        total, metrics = loss(inputs, loss_state)
        return total, (metrics, outputs, intermediates)

    (total, (metrics, outputs, intermediates)), grads = jax.value_and_grad(evaluate, has_aux=True)(
        params
    )
    groups = param_groups(params)

    def norms(tree) -> dict[str, float]:
        return {
            g: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves)))
            for g, leaves in zip(groups, group_leaves(tree, groups), strict=True)
        }

    grad_norms = {"total": norms(grads)}
    total_sq = _dot(grads, grads)
    shares = {}
    for name in names:  # one backward pass per term
        term_grads = jax.grad(lambda p, n=name: evaluate(p)[1][0][f"loss/{n}"])(params)
        grad_norms[name] = norms(term_grads)
        weight = float(metrics.get(f"weight/{name}", 1.0))
        shares[name] = weight * _dot(term_grads, grads) / max(total_sq, 1e-30)
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    update, _ = optimizer.update(grads, opt_state, params)
    to_np = lambda tree: jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    param_norms, update_norms = norms(params), norms(update)
    record = {
        "step": step,
        "loss": float(total),
        **{k: float(v) for k, v in metrics.items()},
        **{f"diag/grad_share/{n}": v for n, v in shares.items() if n in loss.term_names},
        **{f"diag/layer_grad_norm/{g}": v for g, v in grad_norms["total"].items()},
        **{f"diag/param_norm/{g}": v for g, v in param_norms.items()},
        **{
            f"diag/update_ratio/{g}": u / max(p, 1e-30)
            for (g, u), p in zip(update_norms.items(), param_norms.values(), strict=True)
        },
        **{k: float(v) for k, v in activation_stats(intermediates).items()},
    }
    return StepInspection(
        outputs=to_np(outputs),
        intermediates=to_np(intermediates),
        terms={n: float(metrics[f"loss/{n}"]) for n in names},
        weights={
            k[len("weight/") :]: float(v) for k, v in metrics.items() if k.startswith("weight/")
        },
        total=float(total),
        grad_norms=grad_norms,
        grads=to_np(grads),
        update=to_np(update),
        update_norms=update_norms,
        flags=find_flags([record], regularizers=loss.regularizer_names),
    )


def _dot(a, b) -> float:
    return float(
        sum(
            np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64))
            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
        )
    )


def inspect_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[StepInspection, int]:
    """`inspect_step` on a run dir's checkpoint (latest by default) and the batch after it.

    Rebuilds the experiment from the script recorded in ``config.json``, restores
    the checkpoint's train state (params, model state, optimizer state and loss
    state), and takes the batch that the next train step would use (array data
    only): the update shown is the one the run applies next. Returns
    ``(inspection, checkpoint_step)``.
    """
    run = RunDir.of(run_dir)
    module, config, _ = run.load_experiment()
    exp = module.build(config)
    if not isinstance(exp.train, Mapping):
        raise ValueError(
            f"the experiment of {Path(run_dir)} streams its training data (an iterable), which "
            "cannot be rewound to the next batch; call jaxmint.debug.inspect_step in Python "
            "with a batch of your choosing"
        )
    loader = ArrayLoader(exp.train, config.batch_size, seed=config.seed)
    steps = build_steps(
        exp.model, exp.loss, exp.optimizer, input_key=exp.input_key, metrics=exp.metrics
    )
    shapes = next(loader.batches(0))  # any batch: the state's shapes do not depend on it
    template = jax.eval_shape(steps.init, jax.random.PRNGKey(config.seed), shapes)
    state, chosen = run.read_state(step, template._asdict())
    batch = next(loader.batches(chosen))
    _, rng = jax.random.split(jax.random.PRNGKey(config.seed))  # as fit splits its seed
    report = inspect_step(
        exp.model,
        exp.loss,
        exp.optimizer,
        batch,
        state["params"],
        key=jax.random.fold_in(rng, chosen),
        model_state=state["model_state"],
        opt_state=state["opt_state"],
        loss_state=state["loss_state"],
        step=chosen,
        input_key=exp.input_key,
    )
    return report, chosen


def rerun_command(argv: list[str], step: int, workdir: str) -> str:
    """The command line that replays the failed ``step`` of a checked run in debug mode.

    The replay starts from the failed run's newest checkpoint before ``step`` (read
    only) and stops after ``step``, un-jitted, with every other flag as it was:
    ``--steps`` too, so that schedules built from it (warmup, ramps) are the same.
    """
    keep: list[str] = []
    skip_next = False
    dropped = ("--workdir", "--stop-after", "--replay-from")
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--check", "--debug", "--no-check", "--no-debug", "--fresh", "--no-fresh"):
            continue
        if arg in dropped:
            skip_next = True
            continue
        if arg.startswith(tuple(f"{d}=" for d in dropped)):
            continue
        keep.append(arg)
    replay_dir = f"{workdir.rstrip('/')}-replay"
    return " ".join(
        [
            *keep,
            "--debug",
            "--fresh",
            "--replay-from",
            workdir,
            "--stop-after",
            str(step),
            "--workdir",
            replay_dir,
        ]
    )
