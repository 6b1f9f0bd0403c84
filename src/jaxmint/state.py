"""`TrainState`: everything a training run needs to continue, as one pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmint.models import join_variables


class TrainState(NamedTuple):
    """The whole state of a run, as arrays.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: the model's trainable parameters.
      model_state: the model's other collections (e.g. ``batch_stats``).
      opt_state: the optax state of ``params``.
      loss_state: the loss algebra's weights, learnable loss parameters and their
        optimizer state.
      rng: the run's base key; the key of step ``s`` is ``fold_in(rng, s)``.
      guard: the non-finite guard's record (first bad step, which terms and
        parameter groups, and how many steps were skipped).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    loss_state: Any
    rng: jax.Array
    guard: dict

    @property
    def variables(self) -> Any:
        """What the model's ``apply`` takes: the parameters, with any other collections."""
        return join_variables(self.params, self.model_state)


def param_groups(params) -> list[str]:
    """Top-level parameter groups (layers), used to localize non-finite gradients."""
    if isinstance(params, dict) and params:
        return [str(k) for k in params]
    return ["params"]


def group_leaves(tree, groups: list[str]) -> list[list[jax.Array]]:
    """The leaves of ``tree`` under each top-level group in ``groups``."""
    if groups == ["params"] and not (isinstance(tree, dict) and "params" in tree):
        return [jax.tree_util.tree_leaves(tree)]
    return [jax.tree_util.tree_leaves(tree[g]) for g in groups]


def new_guard(num_terms: int, num_groups: int) -> dict:
    return {
        "first_bad_step": jnp.asarray(-1, jnp.int32),
        "bad_terms": jnp.zeros((num_terms + 1,), bool),  # index 0 is the total
        "bad_groups": jnp.zeros((num_groups,), bool),
        "skipped": jnp.asarray(0, jnp.int32),
    }
