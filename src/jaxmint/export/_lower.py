"""Lower a model's predict function with `jax.export`, weights as arguments."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import export as jax_export

from jaxmint._tree import flat_with_names

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what to do."""


@contextlib.contextmanager
def no_source_paths():
    """Locations name the layer (``jit(predict)/Net/whiten/qr``), not the exporting
    machine's file paths."""
    settings = {
        "jax_hlo_source_file_canonicalization_regex": ".*",
        "jax_traceback_in_locations_limit": 0,
    }
    old = {k: getattr(jax.config, k) for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)


def predict_function(model, variables, input_key: str) -> tuple[Callable, list[str], list]:
    """``predict(weights, inputs)`` calling ``model.apply`` in inference mode.

    Returns the function, the weight names (``params/dense0/kernel``...) in
    argument order, and the weight arrays.
    """
    named = flat_with_names(variables)
    names = list(named)
    arrays = [named[n] for n in names]
    treedef = jax.tree_util.tree_structure(variables)

    def predict(weights, inputs):
        v = jax.tree_util.tree_unflatten(treedef, weights)
        return model.apply(v, inputs[input_key], train=False)

    return predict, names, arrays


def lower(
    predict: Callable,
    weights: Sequence[Any],
    sample: np.ndarray,
    input_key: str,
    *,
    platforms: Sequence[str],
    batch_size: int | None,
    keep_unused: bool = False,
) -> jax_export.Exported:
    """Export ``predict`` for a symbolic batch (``batch_size=None``) or a fixed one.

    ``keep_unused`` keeps weights the function never reads as arguments of the
    module, for consumers that call it with every weight (IREE)."""
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise ExportError(f"unknown platforms {bad or platforms}; choose from {PLATFORMS}")
    batch = jax_export.symbolic_shape("batch")[0] if batch_size is None else batch_size
    x_spec = jax.ShapeDtypeStruct((batch, *sample.shape[1:]), sample.dtype)
    w_specs = [jax.ShapeDtypeStruct(np.shape(w), np.asarray(w).dtype) for w in weights]
    with no_source_paths():
        try:
            jitted = jax.jit(predict, keep_unused=keep_unused)
            return jax_export.export(jitted, platforms=tuple(platforms))(
                w_specs, {input_key: x_spec}
            )
        except Exception as e:
            kind = "a symbolic batch" if batch_size is None else f"batch size {batch_size}"
            raise ExportError(
                f"lowering the predict function for {kind} on {list(platforms)} failed: "
                f"{type(e).__name__}: {e}. If the model needs a static batch size, pass "
                "fixed batch sizes (--batch-sizes 1,8 --fixed-batch)."
            ) from e


def output_specs(
    predict: Callable, weights: Sequence[Any], sample: np.ndarray, input_key: str
) -> tuple[list[dict], bool]:
    """Output names, dtypes and shapes (``"batch"`` for the batch dimension) and whether
    the model returns a single array, by abstract evaluation (nothing is compiled)."""
    w_specs = [jax.ShapeDtypeStruct(np.shape(w), np.asarray(w).dtype) for w in weights]
    batch = jax_export.symbolic_shape("batch")[0]
    x_spec = jax.ShapeDtypeStruct((batch, *sample.shape[1:]), sample.dtype)
    try:
        out = jax.eval_shape(predict, w_specs, {input_key: x_spec})
    except Exception:  # a model that needs a static batch: the sample's size stands for it
        x_spec = jax.ShapeDtypeStruct(sample.shape, sample.dtype)
        try:
            out = jax.eval_shape(predict, w_specs, {input_key: x_spec})
        except Exception as e:
            raise ExportError(
                f"the predict function fails on inputs of shape {sample.shape} and dtype "
                f"{sample.dtype}: {type(e).__name__}: {e}"
            ) from e
        n = sample.shape[0]
        out = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(
                (batch, *a.shape[1:]) if a.shape[:1] == (n,) else a.shape, a.dtype
            ),
            out,
        )
    avals, tree = jax.tree_util.tree_flatten(out)
    leaves_tree = jax.tree_util.tree_unflatten(tree, list(range(len(avals))))
    if isinstance(leaves_tree, int):
        named, single = {"output": leaves_tree}, True
    elif isinstance(leaves_tree, dict) and all(
        isinstance(k, str) and isinstance(v, int) for k, v in leaves_tree.items()
    ):
        named, single = leaves_tree, False
    else:
        raise ExportError(
            "the model must return one array or a flat dict of arrays keyed by strings to be "
            f"exported, got outputs structured as {tree}"
        )
    specs = [
        {
            "name": name,
            "dtype": str(avals[i].dtype),
            "shape": [d if isinstance(d, int) else str(d) for d in avals[i].shape],
        }
        for name, i in named.items()
    ]
    return specs, single
