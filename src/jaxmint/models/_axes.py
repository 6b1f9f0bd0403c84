"""Logical axis names for models that carry none: rules by parameter path."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax

from jaxmint.models._model import Model, split_variables


def axes_by_path(model: Model, patterns: Sequence[tuple[str, Sequence[str | None]]]) -> Model:
    """``model`` with logical axis names given by its parameters' paths.

    For plain-pytree models (and any model without partitioning metadata):
    ``patterns`` is a list of ``(regex, names)``; a parameter whose path
    (``jax.tree_util.keystr`` within the parameters, e.g. ``"['layers'][0]['w']"``)
    matches ``regex`` (`re.search`) gets ``names``, one per dimension (``"embed"``,
    ``"mlp"``, ``"heads"``, ``"vocab"``, ..., or None); the first match wins and
    parameters no pattern matches keep none. The sharding rules then map the names to
    mesh axes as for annotated flax models (docs/parallel.md)::

        model = jaxmint.models.axes_by_path(
            model, [(r"\\['w_in'\\]", ("embed", "mlp")), (r"\\['w_out'\\]", ("mlp", "embed"))]
        )

    A bad regex, a pattern that matches no parameter, or names whose count is not the
    parameter's rank raise `ValueError` naming the pattern and the parameter.
    """
    compiled = []
    for pattern, names in patterns:
        try:
            compiled.append((pattern, re.compile(pattern), tuple(names)))
        except re.error as e:
            raise ValueError(f"axes_by_path: pattern {pattern!r} is not a regex ({e})") from None

    def logical_axes(key, inputs) -> dict[str, tuple]:
        params, _ = split_variables(jax.eval_shape(model.init, key, inputs))
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        paths = [(jax.tree_util.keystr(p), leaf.shape) for p, leaf in leaves]
        out: dict[str, tuple] = {}
        for pattern, regex, names in compiled:
            matched = [(k, shape) for k, shape in paths if regex.search(k)]
            if not matched:
                shown = ", ".join(k for k, _ in paths[:8])
                raise ValueError(
                    f"axes_by_path: pattern {pattern!r} matches no parameter (they are: {shown}"
                    f"{', ...' if len(paths) > 8 else ''})"
                )
            for k, shape in matched:
                if k in out:
                    continue  # an earlier pattern named it
                if len(names) != len(shape):
                    raise ValueError(
                        f"axes_by_path: pattern {pattern!r} gives {len(names)} names {names} to "
                        f"parameter {k} of shape {tuple(shape)}; give one name per dimension"
                    )
                out[k] = names
        return out

    return model._replace(logical_axes=logical_axes)
