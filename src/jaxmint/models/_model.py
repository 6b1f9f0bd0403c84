"""The `Model` contract: a pair of pure functions, `init` and `apply`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

Variables = Mapping[str, Any]
"""A dict of variable collections, e.g. ``{"params": ..., "batch_stats": ...}``."""


class Model(NamedTuple):
    """A model as two pure functions.

    ``init(key, inputs) -> variables`` and
    ``apply(variables, inputs, *, train=False, key=None) -> outputs``.

    ``variables`` is a dict of collections; ``variables["params"]`` is what the
    optimizer trains, every other collection (e.g. ``batch_stats``) is model state.

    Models whose forward pass updates state in training (batch norm) or records
    inner activations (flax ``sow``) also provide ``apply_with_state``, which
    returns ``(outputs, updated_collections)``; the adapters in this package fill
    it in. A plain-function model leaves it out::

        model = jaxmint.Model(
            init=lambda key, x: {"params": {"w": jax.random.normal(key, (x.shape[-1], 3))}},
            apply=lambda v, x, *, train=False, key=None: x @ v["params"]["w"],
        )
    """

    init: Callable[..., Variables]
    apply: Callable[..., Any]
    apply_with_state: Callable[..., tuple[Any, dict]] | None = None

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


def split_variables(variables: Variables) -> tuple[Any, dict]:
    """Split ``variables`` into ``(params, model_state)``."""
    if "params" not in variables:
        raise ValueError(
            "model.init must return a dict of collections with a 'params' entry, got keys "
            f"{sorted(variables)}; wrap plain parameters as {{'params': params}}."
        )
    state = {k: v for k, v in variables.items() if k not in ("params", "intermediates")}
    return variables["params"], state
