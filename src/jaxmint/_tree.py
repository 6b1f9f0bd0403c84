"""Small pytree helpers shared across the package."""

from __future__ import annotations

import jax


def path_str(path) -> str:
    """``"dense0/kernel"`` for a key path, the same whether a node is a dict or a NamedTuple."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flat_with_names(tree) -> dict[str, object]:
    """``{path_str: leaf}`` for every leaf of ``tree``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in flat}
