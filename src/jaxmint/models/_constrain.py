"""Activation layouts by logical axis names.

``constrain(x, "batch", "length", "embed")`` pins an activation's layout to what
the sharding rules say for those names, as parameters are laid out by theirs.
It acts only while `fit` traces its steps on a mesh (`activation_layout`);
on one device, in export, eagerly or under ``jax.eval_shape`` it returns ``x``
as it is, so a model that calls it runs anywhere. The layout is read when the
function is traced: in a loop of your own, enter `activation_layout` inside the
function you jit (as `fit` does), since jax reuses a trace made outside it.

Each mesh axis splits one dimension at most: the first name that claims it wins
(``batch`` takes ``data`` and ``fsdp``, so ``embed``, which the rules give to
``fsdp`` for parameters, stays whole in activations, as in Megatron-style tensor
parallelism). A name without a rule keeps its dimension whole; a dimension its
mesh axes do not divide is left to XLA.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_LAYOUT: contextvars.ContextVar[tuple[Mesh, Mapping] | None] = contextvars.ContextVar(
    "jaxmint_activation_layout", default=None
)


@contextlib.contextmanager
def activation_layout(mesh: Mesh, rules: Mapping[str, str | tuple[str, ...] | None]) -> Iterator:
    """While tracing inside this block, `constrain` lays activations out on ``mesh``."""
    token = _LAYOUT.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``x`` laid out by the logical axis names of its dimensions (one name or None each).

    Example, in a flax module::

        h = jaxmint.models.constrain(h, "batch", "length", "mlp")
    """
    layout = _LAYOUT.get()
    if layout is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(
            f"constrain got {len(names)} axis names {names} for an array of shape {x.shape}; "
            "give one name (or None) per dimension"
        )
    mesh, rules = layout
    spec = split_dims(names, x.shape, rules, dict(mesh.shape), undivided=P.UNCONSTRAINED)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def split_dims(names, shape, rules, sizes: Mapping[str, int], undivided=None) -> list:
    """Per dimension, the mesh axes that split it (an axis name, a tuple of them, or None)
    by each name's rule: leaving out axes of size 1 and axes an earlier dimension took;
    ``undivided`` where the axes do not divide the dimension. Parameters and
    activations are laid out by this one function."""
    spec, used = [], set()
    for name, dim in zip(names, shape, strict=True):
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1 and a not in used)
        if not axes:
            spec.append(None)
        elif dim % math.prod(sizes[a] for a in axes):
            spec.append(undivided)
        else:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
    return spec
