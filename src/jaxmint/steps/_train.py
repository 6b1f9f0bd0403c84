"""Pure train and eval steps built from a model, a loss and an optax optimizer.

Nothing here does I/O or keeps Python state: `jaxmint.fit` jits these functions
once (donating the state) and drives them from a plain Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmint.losses import Loss, LossError, LossInputs
from jaxmint.models._model import Model, join_variables, split_variables
from jaxmint.state import TrainState, group_leaves, new_guard, param_groups


class Steps(NamedTuple):
    """The pure functions of a training run.

    ``init(key, sample_batch) -> TrainState``;
    ``train_step(state, batch) -> (state, metrics)``;
    ``eval_step(state, batch, num_valid) -> metrics`` (means over the first
    ``num_valid`` rows, the rest being padding); ``resume(stored, fresh) ->
    (state, notes)`` the state a resumed run continues with (see `Loss.resume_state`).
    """

    init: Callable[..., TrainState]
    train_step: Callable[..., tuple[TrainState, dict]]
    eval_step: Callable[..., dict]
    term_names: list[str]
    param_groups: Callable[[Any], list[str]]
    resume: Callable[..., tuple[TrainState, list[str]]]


def _cast_floats(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _masked_mean(values, valid):
    values = jnp.asarray(values, jnp.float32)
    if values.ndim == 0:
        raise LossError("a metric must return per-example values, got a scalar")
    mask = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    mask = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _sum_squares(leaves) -> jax.Array:
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves)


def build_steps(
    model: Model,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    input_key: str = "x",
    metrics: Mapping[str, Callable] | None = None,
    grad_accum: int = 1,
    compute_dtype: Any = None,
    axis_name: str | None = None,
) -> Steps:
    """Build the pure `Steps` of a run.

    Args:
      input_key: the batch key fed to the model.
      metrics: extra per-example metrics ``fn(outputs, batch)``, logged by name.
      grad_accum: split each batch into this many micro-batches, scanned one after
        another (``lax.scan``), and average their gradients: the same update with
        less activation memory. Batch statistics are threaded through micro-batches.
      compute_dtype: e.g. ``jnp.bfloat16`` to run the forward and backward pass in
        that dtype while params, gradients and optimizer state stay float32.
      axis_name: set when the steps run per device under ``shard_map`` (the
        ``pmap`` strategy): gradients, metrics and batch statistics are averaged
        over that axis with ``pmean``, and evaluation weighs devices by their
        number of real (unpadded) rows.
    """
    metrics = dict(metrics or {})
    term_names = loss.term_names
    loss.metric_names()  # raise on clashing names before anything is traced
    compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)

    def init(key: jax.Array, sample_batch: Mapping[str, Any]) -> TrainState:
        init_key, rng = jax.random.split(key)
        variables = model.init(init_key, sample_batch[input_key])
        params, model_state = split_variables(variables)
        loss_state = loss.init()
        loss_state["opt_state"] = optimizer.init(loss_state["params"])
        return TrainState(
            step=jnp.asarray(0, jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=optimizer.init(params),
            loss_state=loss_state,
            rng=rng,
            guard=new_guard(len(term_names), len(param_groups(params))),
        )

    def forward(params, model_state, batch, *, train, key):
        variables = join_variables(_cast_floats(params, compute_dtype), model_state)
        inputs = _cast_floats(batch[input_key], compute_dtype)
        outputs, updates = model.forward(variables, inputs, train=train, key=key)
        updates = dict(updates)
        intermediates = _cast_floats(updates.pop("intermediates", {}), jnp.float32)
        new_model_state = (
            None if model_state is None else {k: updates.get(k, v) for k, v in model_state.items()}
        )
        return _cast_floats(outputs, jnp.float32), intermediates, new_model_state

    def loss_fn(trainable, model_state, batch, step, loss_weights, key):
        params, loss_params = trainable
        outputs, intermediates, model_state = forward(
            params, model_state, batch, train=True, key=key
        )
        inputs = LossInputs(outputs, batch, params, intermediates, step)
        total, logged = loss(inputs, {"weights": loss_weights, "params": loss_params})
        valid = jnp.ones((inputs.batch_size,), bool)
        for name, fn in metrics.items():
            logged[name] = jax.lax.stop_gradient(_masked_mean(fn(outputs, batch), valid))
        return total, (logged, model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(state: TrainState, batch, key):
        trainable = (state.params, state.loss_state["params"])
        weights = state.loss_state["weights"]
        if grad_accum == 1:
            (total, (logged, model_state)), grads = grad_fn(
                trainable, state.model_state, batch, state.step, weights, key
            )
            return total, logged, model_state, grads

        def split(a):
            # Micro-batch i takes rows i, i+k, i+2k...: under data sharding every
            # device then holds an equal share of each micro-batch (no reshuffle).
            return a.reshape(a.shape[0] // grad_accum, grad_accum, *a.shape[1:]).swapaxes(0, 1)

        micro = jax.tree_util.tree_map(split, batch)

        def body(carry, xs):
            acc, model_state = carry
            i, mb = xs
            (total, (logged, model_state)), g = grad_fn(
                trainable, model_state, mb, state.step, weights, jax.random.fold_in(key, i)
            )
            return (jax.tree_util.tree_map(jnp.add, acc, g), model_state), (total, logged)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        (grads, model_state), (totals, logged) = jax.lax.scan(
            body, (zeros, state.model_state), (jnp.arange(grad_accum), micro)
        )
        grads = jax.tree_util.tree_map(lambda g: g / grad_accum, grads)
        logged = jax.tree_util.tree_map(jnp.mean, logged)
        return jnp.mean(totals), logged, model_state, grads

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:  # a different dropout mask on each device
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        total, logged, model_state, (grads, loss_grads) = gradients(state, batch, key)
        if axis_name is not None:
            total, logged, grads, loss_grads = jax.lax.pmean(
                (total, logged, grads, loss_grads), axis_name
            )
            model_state = jax.tree_util.tree_map(
                lambda x: (
                    jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x
                ),
                model_state,
            )

        # Non-finite guard, from one sum of squares per parameter group (which also
        # gives the logged gradient norm): any NaN or inf in a group makes its sum
        # non-finite. (So does a finite gradient above ~1e19 whose square overflows.)
        groups = param_groups(state.params)
        group_sq = jnp.stack([_sum_squares(g) for g in group_leaves(grads, groups)])
        groups_ok = jnp.isfinite(group_sq)
        terms_ok = jnp.stack(
            [jnp.isfinite(total)] + [jnp.isfinite(logged[f"loss/{n}"]) for n in term_names]
        )
        loss_ok = jnp.isfinite(_sum_squares(jax.tree_util.tree_leaves(loss_grads)))
        ok = terms_ok.all() & groups_ok.all() & loss_ok

        def update(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            loss_state = state.loss_state
            if jax.tree_util.tree_leaves(loss_state["params"]):
                l_updates, l_opt = optimizer.update(
                    loss_grads, loss_state["opt_state"], loss_state["params"]
                )
                loss_state = {
                    **loss_state,
                    "params": optax.apply_updates(loss_state["params"], l_updates),
                    "opt_state": l_opt,
                }
            return params, opt_state, loss_state, model_state

        def skip(_):
            return state.params, state.opt_state, state.loss_state, state.model_state

        # A conditional, not a select: on a good step only the update runs, and the
        # new state can reuse the donated buffers (a select would materialize both).
        params, opt_state, loss_state, new_model_state = jax.lax.cond(ok, update, skip, None)

        guard = state.guard
        first = (guard["first_bad_step"] < 0) & ~ok
        guard = {
            "first_bad_step": jnp.where(first, state.step + 1, guard["first_bad_step"]),
            "bad_terms": jnp.where(first, ~terms_ok, guard["bad_terms"]),
            "bad_groups": jnp.where(first, ~groups_ok, guard["bad_groups"]),
            "skipped": guard["skipped"] + (~ok).astype(jnp.int32),
        }
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            model_state=new_model_state,
            opt_state=opt_state,
            loss_state=loss_state,
            rng=state.rng,
            guard=guard,
        )
        out = {"loss": total, **logged, "grad_norm": jnp.sqrt(jnp.sum(group_sq))}
        out["skipped_steps"] = guard["skipped"]
        return new_state, out

    def eval_step(state: TrainState, batch, num_valid) -> dict:
        size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        rows = jnp.arange(size)
        if axis_name is not None:
            rows = rows + jax.lax.axis_index(axis_name) * size
        valid = rows < num_valid
        outputs, intermediates, _ = forward(
            state.params, state.model_state, batch, train=False, key=None
        )
        inputs = LossInputs(outputs, batch, state.params, intermediates, state.step)
        total, logged = loss(inputs, state.loss_state, where=valid)
        for name, fn in metrics.items():
            logged[name] = _masked_mean(fn(outputs, batch), valid)
        out = {"loss": total, **logged}
        if axis_name is not None:
            count = jnp.sum(valid).astype(jnp.float32)
            total_count = jax.lax.psum(count, axis_name)
            out = jax.tree_util.tree_map(
                lambda v: jax.lax.psum(v * count, axis_name) / jnp.maximum(total_count, 1.0),
                out,
            )
        return out

    def resume(stored: dict, fresh: TrainState, stored_terms: list[str] | None):
        """``(state, notes)``: ``stored`` (a restored state, as a dict) under today's loss.

        Everything is the checkpoint's except the loss weights, which are the code's;
        the guard's per-term record is reset when the terms changed.
        """
        loss_state, notes = loss.resume_state(stored["loss_state"], stored_terms)
        if "opt_state" not in loss_state:  # learned loss weights read from an older layout
            loss_state["opt_state"] = optimizer.init(loss_state["params"])
            for part in ("params", "opt_state"):
                loss_state[part] = jax.tree_util.tree_map(
                    lambda new, like: jax.device_put(new, like.sharding),
                    loss_state[part],
                    fresh.loss_state[part],
                )
        guard = dict(stored["guard"])
        for key in ("bad_terms", "bad_groups"):
            if jnp.shape(guard[key]) != jnp.shape(fresh.guard[key]):
                guard[key] = fresh.guard[key]
        weights = jax.tree_util.tree_map(
            lambda new, like: jax.device_put(new, like.sharding),
            loss_state["weights"],
            fresh.loss_state["weights"],
        )
        state = TrainState(**{**stored, "loss_state": {**loss_state, "weights": weights}})
        return state._replace(guard=guard), notes

    return Steps(init, train_step, eval_step, term_names, param_groups, resume)
