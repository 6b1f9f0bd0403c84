"""Diagnostic statistics of one step: per-term gradients, per-layer norms, activations.

Everything here is a pure function of the train state and a batch, jitted
separately from the train step and run only every ``diagnose_every`` steps, so
the other steps pay nothing. Cost on those steps: one forward pass, one backward
pass per named loss term (``jax.jacrev`` over the stacked weighted terms) and one
optimizer update that is computed but not applied.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import jax
import jax.numpy as jnp
import optax

from jaxmint._tree import flat_with_names
from jaxmint.losses import Loss, LossInputs
from jaxmint.models._model import Model, join_variables
from jaxmint.state import TrainState, group_leaves, param_groups

SATURATION = 0.97  # |activation| above this counts as saturated (tanh/sigmoid ranges)
# Saturation is judged only on bounded activations (every value in [-1, 1]: the
# outputs of tanh, sigmoid, softmax); an unbounded one (a residual stream, a ReLU
# layer's outputs) reports 0, since large values there are not saturation.


def _norm(leaves) -> jax.Array:
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _dot(a, b) -> jax.Array:
    return sum(
        jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def activation_stats(intermediates) -> dict[str, jax.Array]:
    """Mean, std, dead-unit fraction and saturation of every sown activation."""
    out = {}
    for path, x in flat_with_names(intermediates).items():
        x = jnp.asarray(x, jnp.float32)
        name = path.removesuffix("/0")  # flax sow stores a tuple
        units = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x[:, None]
        out[f"diag/act_mean/{name}"] = jnp.mean(x)
        out[f"diag/act_std/{name}"] = jnp.std(x)
        # A unit is dead when it is <= 0 for every example of the batch (ReLU).
        out[f"diag/dead/{name}"] = jnp.mean(jnp.all(units <= 0, axis=0).astype(jnp.float32))
        bounded = jnp.max(jnp.abs(x)) <= 1.0
        saturated = jnp.mean((jnp.abs(x) > SATURATION).astype(jnp.float32))
        out[f"diag/saturated/{name}"] = jnp.where(bounded, saturated, 0.0)
    return out


def build_diagnose_step(
    model: Model,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    *,
    input_key: str = "x",
) -> Callable[[TrainState, dict], dict]:
    """``diagnose(state, batch) -> metrics`` with ``diag/...`` entries (see module doc)."""
    names = loss.term_names

    def diagnose(state: TrainState, batch) -> dict:
        key = jax.random.fold_in(state.rng, state.step)

        def terms(params):
            variables = join_variables(params, state.model_state)
            outputs, updates = model.forward(variables, batch[input_key], train=True, key=key)
            intermediates = dict(updates).get("intermediates", {})
            inputs = LossInputs(outputs, batch, params, intermediates, state.step)
            _, logged = loss(inputs, {**state.loss_state})
            weighted = jnp.stack(
                [
                    jax.lax.stop_gradient(logged.get(f"weight/{n}", 1.0)) * logged[f"loss/{n}"]
                    for n in names
                ]
            )
            return weighted, intermediates

        per_term, intermediates = jax.jacrev(terms, has_aux=True)(state.params)
        term_grads = [
            jax.tree_util.tree_map(lambda g, i=i: g[i], per_term) for i in range(len(names))
        ]
        total = jax.tree_util.tree_map(lambda *g: sum(g), *term_grads)
        total_sq = jnp.maximum(_dot(total, total), 1e-30)
        out = {}
        norms = [_norm(jax.tree_util.tree_leaves(g)) for g in term_grads]
        for n, g, gn in zip(names, term_grads, norms, strict=True):
            out[f"diag/grad_norm/{n}"] = gn
            # Projection share: sums to 1 over terms; negative means the term fights the rest.
            out[f"diag/grad_share/{n}"] = _dot(g, total) / total_sq
        for (i, a), (j, b) in combinations(enumerate(names), 2):
            denom = jnp.maximum(norms[i] * norms[j], 1e-30)
            out[f"diag/grad_cos/{a}|{b}"] = _dot(term_grads[i], term_grads[j]) / denom

        updates, _ = optimizer.update(total, state.opt_state, state.params)
        groups = param_groups(state.params)
        for g, p_leaves, g_leaves, u_leaves in zip(
            groups,
            group_leaves(state.params, groups),
            group_leaves(total, groups),
            group_leaves(updates, groups),
            strict=True,
        ):
            p_norm = _norm(p_leaves)
            out[f"diag/param_norm/{g}"] = p_norm
            out[f"diag/layer_grad_norm/{g}"] = _norm(g_leaves)
            out[f"diag/update_ratio/{g}"] = _norm(u_leaves) / jnp.maximum(p_norm, 1e-30)
        out.update(activation_stats(intermediates))
        return out

    return diagnose
