"""Rematerialization: a block's activations recomputed in the backward pass, not kept.

A train step keeps every activation the backward pass needs; for a deep or long
model that is most of the memory. Wrapping each block in `jax.checkpoint` keeps
only what its *policy* saves and recomputes the rest during the backward pass:
less memory, for the compute of recomputing it. The gradients are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

Policy = str | Callable[..., bool]
"""A policy name (see `POLICIES`) or a `jax.checkpoint` policy function."""

POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no remat: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block's inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    # keep matmuls without batch dimensions (projections, not attention scores)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def policy_of(remat: Policy) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy for ``remat``; None for ``"none"``."""
    if callable(remat):
        return remat
    if remat not in POLICIES:
        raise ValueError(
            f"unknown remat policy {remat!r}; use one of {sorted(POLICIES)} or a "
            "jax.checkpoint_policies function"
        )
    return POLICIES[remat]


def remat(block: Any, policy: Policy = "full") -> Any:
    """``block`` with its activations recomputed in the backward pass under ``policy``.

    ``block`` is a flax linen module class (wrapped by `flax.linen.remat`; its
    parameters keep their names) or a function of arrays (wrapped by
    `jax.checkpoint`). ``policy`` is ``"full"`` (keep only the block's inputs),
    ``"dots"``, ``"dots_no_batch"``, ``"none"`` (``block`` unchanged) or a
    `jax.checkpoint_policies` function. Example::

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                for i in range(8):
                    x = jaxmint.models.remat(MyBlock, "dots")(name=f"block{i}")(x)
                return x
    """
    resolved = policy_of(policy)
    if policy == "none":
        return block
    if isinstance(block, type) and issubclass(block, nn.Module):
        return _remat_module(block, resolved)
    if callable(block):
        return jax.checkpoint(block, policy=resolved)
    raise TypeError(
        f"remat wraps a flax linen module class or a function, got {type(block).__name__}"
    )


@functools.cache
def _remat_module(cls: type[nn.Module], policy) -> type[nn.Module]:
    # One wrapped class per (class, policy): a module built in __call__ is not re-wrapped.
    return nn.remat(cls, policy=policy, prevent_cse=True)
