"""Adapters that turn flax modules (linen and nnx) into pure-function `Model`s."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
from flax import nnx

from jaxmint.models._model import Model

_INTERMEDIATES = "intermediates"


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _train_kwargs(fn: Callable, train: bool) -> dict:
    """Keyword arguments that tell ``fn`` whether it is training, by its own spelling."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if "train" in params:
        return {"train": train}
    if "training" in params:
        return {"training": train}
    if "deterministic" in params:
        return {"deterministic": not train}
    return {}


def from_linen(module, *, rng_collections: Sequence[str] = ("dropout",)) -> Model:
    """Adapt a ``flax.linen.Module`` to a `Model`.

    The module's ``__call__`` may take ``train``, ``training`` or ``deterministic``;
    the adapter passes the right one. Collections other than ``params`` (e.g.
    ``batch_stats``) are model state: they are mutable in training and returned
    as updates. Values stored with ``self.sow("intermediates", ...)`` are
    collected on every call so loss terms can use them.

    Example::

        model = jaxmint.models.from_linen(nn.Dense(10))
    """
    call_kwargs = lambda train: _train_kwargs(module.__call__, train)

    def boxed_init(key: jax.Array, inputs: Any) -> dict:
        keys = jax.random.split(key, 1 + len(rng_collections))
        rngs = {"params": keys[0], **dict(zip(rng_collections, keys[1:], strict=True))}
        variables = dict(module.init(rngs, inputs, **call_kwargs(False)))
        variables.pop(_INTERMEDIATES, None)
        return variables

    def init(key: jax.Array, inputs: Any) -> dict:
        # Partitioning metadata (nn.with_logical_partitioning) stays out of the arrays.
        return nn.meta.unbox(boxed_init(key, inputs))

    def logical_axes(key: jax.Array, inputs: Any) -> dict[str, tuple]:
        boxed = jax.eval_shape(boxed_init, key, inputs)
        flat, _ = jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
        )
        return {
            jax.tree_util.keystr(path): tuple(leaf.names)
            for path, leaf in flat
            if isinstance(leaf, nn.LogicallyPartitioned)
        }

    def rngs_for(key):
        if key is None:
            return None
        keys = jax.random.split(key, len(rng_collections))
        return dict(zip(rng_collections, keys, strict=True))

    def apply(variables, inputs, *, train: bool = False, key: jax.Array | None = None):
        return module.apply(variables, inputs, rngs=rngs_for(key), **call_kwargs(train))

    def apply_with_state(variables, inputs, *, train: bool = False, key=None):
        mutable = [_INTERMEDIATES]
        if train:
            mutable += [c for c in variables if c not in ("params", _INTERMEDIATES)]
        outputs, updates = module.apply(
            variables, inputs, rngs=rngs_for(key), mutable=mutable, **call_kwargs(train)
        )
        return outputs, dict(updates)

    return Model(init, apply, apply_with_state, logical_axes=logical_axes)


def from_nnx(module_or_factory) -> Model:
    """Adapt a ``flax.nnx`` module to a `Model` through ``nnx.split``/``nnx.merge``.

    Pass either a module instance (``init`` then returns its current weights and
    ignores the key) or a factory ``rngs -> module`` (``init`` builds a fresh
    module from the key). Variables are plain nested dicts: ``params`` for
    ``nnx.Param`` and ``state`` for every other variable (batch statistics, RNG
    counters), so the train step stays a pure function of arrays. Values stored
    with ``self.sow(nnx.Intermediate, ...)`` come back as ``intermediates``.

    Parameters annotated with ``nnx.with_partitioning(init, ("embed", "mlp"))`` carry
    those names as logical axes: `fit` shards them by its rules, as it does linen's
    ``nn.with_logical_partitioning``. A factory builds its module outside any mesh
    (flax's eager sharding is off while it runs): the rules place the arrays.

    Example::

        model = jaxmint.models.from_nnx(lambda rngs: nnx.Linear(64, 10, rngs=rngs))
    """

    if isinstance(module_or_factory, nnx.Module):
        template = module_or_factory
        factory = None
    else:
        user_factory = module_or_factory

        def factory(rngs):
            with _lazy_sharding():
                return user_factory(rngs)

        template = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    graphdef, _, _, _ = nnx.split(template, nnx.Param, nnx.Intermediate, ...)

    def pure(state) -> dict:
        to_pure = getattr(nnx, "to_pure_dict", None)  # newer flax; older: a State method
        tree = to_pure(state) if to_pure is not None else state.to_pure_dict()
        # Typed PRNG keys (nnx.Rngs) travel as their raw uint32 data, which
        # checkpoints and exports can hold; _merge wraps them back.
        return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)

    def typed_keys(template: dict, values: dict) -> dict:
        return jax.tree_util.tree_map(
            lambda t, v: jax.random.wrap_key_data(v) if _is_key(t) else v, template, values
        )

    def _to_vars(params, intermediates, rest) -> dict:
        del intermediates
        return {"params": pure(params), "state": pure(rest)}

    def init(key: jax.Array, inputs: Any) -> dict:
        del inputs
        module = factory(nnx.Rngs(key)) if factory is not None else module_or_factory
        _, params, intermediates, rest = nnx.split(module, nnx.Param, nnx.Intermediate, ...)
        return _to_vars(params, intermediates, rest)

    _, _, _, rest_template = nnx.split(template, nnx.Param, nnx.Intermediate, ...)
    to_pure = getattr(nnx, "to_pure_dict", None)
    rest_abstract = to_pure(rest_template) if to_pure else rest_template.to_pure_dict()

    def _merge(variables):
        _, params, intermediates, rest = nnx.split(template, nnx.Param, nnx.Intermediate, ...)
        nnx.replace_by_pure_dict(params, variables["params"])
        state = variables.get("state", {})
        if state:
            state = typed_keys(rest_abstract, state)
        nnx.replace_by_pure_dict(rest, state)
        return nnx.merge(graphdef, params, intermediates, rest)

    def _run(variables, inputs, train, key):
        module = _merge(variables)
        if key is not None:
            nnx.reseed(module, dropout=key)
        module.train() if train else module.eval()
        outputs = module(inputs)
        _, _, intermediates, rest = nnx.split(module, nnx.Param, nnx.Intermediate, ...)
        return outputs, intermediates, rest

    def apply(variables, inputs, *, train: bool = False, key=None):
        return _run(variables, inputs, train, key)[0]

    def apply_with_state(variables, inputs, *, train: bool = False, key=None):
        outputs, intermediates, rest = _run(variables, inputs, train, key)
        updates = {_INTERMEDIATES: pure(intermediates)}
        if train:
            updates["state"] = pure(rest)
        return outputs, updates

    axes = _nnx_axes(nnx.split(template, nnx.Param, ...)[1])
    return Model(init, apply, apply_with_state, logical_axes=lambda key, inputs: axes)


def _lazy_sharding():
    """Build nnx variables without placing them (flax >= 0.12 places annotated ones at
    creation, which needs a mesh): `fit` places them later by its rules."""
    if hasattr(flax.config, "flax_always_shard_variable"):
        return flax.config.temp_flip_flag("always_shard_variable", False)
    return contextlib.nullcontext()


def _nnx_axes(params) -> dict[str, tuple]:
    """``{"['params'][...]": names}`` of the annotated ``nnx.Param``s (their sharding
    metadata: ``out_sharding`` in flax >= 0.12, ``sharding_names`` or ``sharding`` before)."""
    flat = nnx.to_flat_state(params) if hasattr(nnx, "to_flat_state") else params.flat_state()
    axes = {}
    for path, variable in flat:
        meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
        names = next(
            (meta[k] for k in ("out_sharding", "sharding_names", "sharding") if meta.get(k)),
            None,
        )
        if names is not None:
            keys = [jax.tree_util.DictKey(k) for k in ("params", *path)]
            axes[jax.tree_util.keystr(tuple(keys))] = tuple(names)
    return axes
