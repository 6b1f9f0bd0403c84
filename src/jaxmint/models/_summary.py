"""`summary`: a model's layers, parameter shapes, sizes, activation shapes and FLOPs.

Nothing is allocated or trained: shapes come from ``jax.eval_shape`` and FLOPs
from XLA's cost analysis of the compiled forward pass (one compile), its scans
unrolled: XLA counts a loop's body once, whatever its trip count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex

from jaxmint.models._model import Model, split_variables


@dataclasses.dataclass
class LayerSummary:
    """One top-level parameter group (a flax submodule name, or ``params``)."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    params: int
    bytes: int


@dataclasses.dataclass
class ModelSummary:
    """What `summary` returns; ``str()`` of it is the printed table.

    Attributes:
      layers: one `LayerSummary` per top-level parameter group, in order.
      activations: shapes of the model's outputs (``"outputs"``) and of every sown
        intermediate, for the sample batch.
      total_params, total_bytes: over every layer (``params`` only, not model state).
      flops_per_example: XLA's count for the forward pass (every iteration of its
        scans, such as scanned layers) divided by the batch size, or None when the
        backend reports no cost analysis. A ``while_loop`` whose trip count is known
        only at run time is counted once.
      batch_size: the sample's batch size.
    """

    layers: list[LayerSummary]
    activations: dict[str, tuple[int, ...]]
    total_params: int
    total_bytes: int
    flops_per_example: float | None
    batch_size: int

    def __str__(self) -> str:
        rows = [("layer", "parameter shapes", "params", "bytes")]
        for layer in self.layers:
            shapes = ", ".join(f"{k} {_shape(v)}" for k, v in layer.shapes.items())
            rows.append((layer.name, shapes, f"{layer.params:,}", _size(layer.bytes)))
        rows.append(("total", "", f"{self.total_params:,}", _size(self.total_bytes)))
        text = _table(rows)
        text += "\n\n" + _table(
            [("activation", f"shape (batch {self.batch_size})")]
            + [(k, _shape(v)) for k, v in self.activations.items()]
        )
        flops = "n/a" if self.flops_per_example is None else f"{self.flops_per_example:,.0f}"
        return text + f"\n\nforward FLOPs per example: {flops}"


def summary(
    model: Model,
    sample: Any,
    *,
    input_key: str = "x",
    key: jax.Array | None = None,
    show: bool = True,
) -> ModelSummary:
    """Print and return a table of ``model``'s layers for a sample batch or inputs.

    Args:
      sample: a batch (a dict holding ``input_key``) or the model's inputs, with a
        leading batch axis; only its shapes and dtypes are used.
      show: print the table (``False`` only returns it).

    Example::

        s = jaxmint.models.summary(jaxmint.models.mlp([32], num_outputs=10), np.zeros((4, 64)))
        assert s.total_params == 64 * 32 + 32 + 32 * 10 + 10
    """
    inputs = sample[input_key] if isinstance(sample, Mapping) and input_key in sample else sample
    inputs = jax.tree_util.tree_map(
        lambda a: (
            jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)
            if not isinstance(a, jax.ShapeDtypeStruct)
            else a
        ),
        inputs,
    )
    key = jax.random.PRNGKey(0) if key is None else key
    variables = jax.eval_shape(model.init, key, inputs)
    params, _ = split_variables(variables)
    groups = list(params) if isinstance(params, Mapping) and params else None
    layers = []
    for name in groups or ["params"]:
        tree = params[name] if groups else params
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        shapes = {(_path(p) or name): tuple(leaf.shape) for p, leaf in flat}
        count = sum(int(np.prod(leaf.shape)) for _, leaf in flat)
        size = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for _, leaf in flat)
        layers.append(LayerSummary(str(name), shapes, count, size))

    def forward(v, x):
        return model.forward(v, x, train=False, key=None)

    outputs, updates = jax.eval_shape(forward, variables, inputs)
    activations = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(outputs)[0]:
        activations["outputs" + (f"/{_path(p)}" if _path(p) else "")] = tuple(leaf.shape)
    for p, leaf in jax.tree_util.tree_flatten_with_path(dict(updates).get("intermediates", {}))[0]:
        activations[_path(p)] = tuple(leaf.shape)
    batch = int(jax.tree_util.tree_leaves(inputs)[0].shape[0])
    result = ModelSummary(
        layers=layers,
        activations=activations,
        total_params=sum(layer.params for layer in layers),
        total_bytes=sum(layer.bytes for layer in layers),
        flops_per_example=_flops(model, variables, inputs, batch),
        batch_size=batch,
    )
    if show:
        print(result)
    return result


def _flops(model: Model, variables, inputs, batch: int) -> float | None:
    # One compile of the forward pass on abstract values; nothing runs.
    def apply(v, x):
        return model.apply(v, x, train=False, key=None)

    try:
        closed = jax.make_jaxpr(apply)(variables, inputs)
        if _has_scan(closed.jaxpr):  # XLA counts a loop body once: count it unrolled
            unrolled = jex.jaxpr_as_fun(_unroll_scans(closed))
            args = jax.tree_util.tree_leaves((variables, inputs))
            cost = jax.jit(unrolled).lower(*args).compile().cost_analysis()
        else:
            cost = jax.jit(apply).lower(variables, inputs).compile().cost_analysis()
    except Exception:  # a backend without cost analysis: report n/a, not an error
        return None
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"]) / max(batch, 1)


def _has_scan(jaxpr: jex.Jaxpr) -> bool:
    """Whether ``jaxpr``, or a jaxpr nested in it, runs a scan."""
    return any(eqn.primitive.name == "scan" for eqn in jaxpr.eqns) or any(
        _has_scan(sub) for sub in jex.subjaxprs(jaxpr)
    )


def _unroll_scans(closed: jex.ClosedJaxpr) -> jex.ClosedJaxpr:
    """``closed`` with every scan, nested ones too, fully unrolled (the same values)."""

    def rewrite(value):
        if isinstance(value, jex.ClosedJaxpr):
            return value.replace(jaxpr=rewrite(value.jaxpr))
        if isinstance(value, jex.Jaxpr):
            eqns = []
            for eqn in value.eqns:
                params = {k: rewrite(v) for k, v in eqn.params.items()}
                if eqn.primitive.name == "scan":
                    params["unroll"] = max(int(params["length"]), 1)
                eqns.append(eqn.replace(params=params))
            return value.replace(eqns=eqns)
        if type(value) is tuple:  # cond's branches (not a NamedTuple of numbers)
            return tuple(rewrite(v) for v in value)
        return value

    return rewrite(closed)


def _path(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    # flax's sow stores a tuple of values: drop its trailing index 0.
    if len(parts) > 1 and parts[-1] == "0":
        parts = parts[:-1]
    return "/".join(parts)


def _shape(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
