"""The `Model` contract: a pair of pure functions, `init` and `apply`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

Variables = Any
"""What ``init`` returns: any pytree of arrays (all of it parameters), or a dict of
flax-style collections such as ``{"params": ..., "batch_stats": ...}``."""


class Model(NamedTuple):
    """A model as two pure functions.

    ``init(key, inputs) -> variables`` and
    ``apply(variables, inputs, *, train=False, key=None) -> outputs``.

    ``variables`` is any pytree of arrays. Without a ``params`` key the whole tree
    is the parameters (plain JAX, equinox- or haiku-style); with flax collections,
    ``variables["params"]`` is what the optimizer trains and every other collection
    (e.g. ``batch_stats``) is model state.

    Models whose forward pass updates state in training (batch norm) or records
    inner activations (flax ``sow``) also provide ``apply_with_state``, which
    returns ``(outputs, updated_collections)``; the adapters in this package fill
    it in. A plain-function model leaves it out::

        model = jaxmint.Model(
            init=lambda key, x: {"w": jax.random.normal(key, (x.shape[-1], 3))},
            apply=lambda params, x, *, train=False, key=None: x @ params["w"],
        )

    ``input_range = (low, high)`` declares that integer inputs lie in
    ``[low, high)``, such as the token ids of a vocabulary: training refuses data
    outside it, and an exported artifact refuses such requests (JAX would clamp the
    gather and answer in silence). The built-in transformer sets it.

    ``logical_axes(key, inputs)`` gives ``{jax.tree_util.keystr(path): names}`` for
    the leaves of ``init``'s variables that have logical axis names: a tuple with
    one name per dimension (``"embed"``, ``"heads"``, ``"mlp"``, ``"vocab"``, ...,
    or None). Sharding rules map the names to mesh axes (docs/parallel.md).
    `from_linen` fills it in from flax's partitioning metadata
    (``nn.with_logical_partitioning``).
    """

    init: Callable[..., Variables]
    apply: Callable[..., Any]
    apply_with_state: Callable[..., tuple[Any, dict]] | None = None
    input_range: tuple[int, int] | None = None
    logical_axes: Callable[..., Any] | None = None

    def forward(
        self, variables: Variables, inputs: Any, *, train: bool, key: jax.Array | None
    ) -> tuple[Any, dict]:
        """Run the model and return ``(outputs, updated_collections)``.

        ``updated_collections`` holds new values of mutable collections (only those
        that changed) and an ``intermediates`` entry with sown activations, if any.
        """
        if self.apply_with_state is not None:
            return self.apply_with_state(variables, inputs, train=train, key=key)
        return self.apply(variables, inputs, train=train, key=key), {}


def split_variables(variables: Variables) -> tuple[Any, dict | None]:
    """Split ``variables`` into ``(params, model_state)``.

    Flax-style collections (a mapping with a ``params`` key) give
    ``(variables["params"], {other collections})``; any other pytree is all
    parameters and gives ``(variables, None)``. `join_variables` is the inverse.
    """
    if isinstance(variables, Mapping) and "params" in variables:
        state = {k: v for k, v in variables.items() if k not in ("params", "intermediates")}
        return variables["params"], state
    return variables, None


def join_variables(params: Any, model_state: dict | None) -> Variables:
    """What ``apply`` takes: ``params`` itself, or the collections around it."""
    if model_state is None:
        return params
    return {"params": params, **model_state}
