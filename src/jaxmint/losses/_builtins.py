"""Built-in loss terms. Each factory returns a named `Term` of per-example values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxmint._tree import path_str
from jaxmint.losses._algebra import LossError, Term, Where, term


def _labels(batch, key: str, *, integer: bool, term_name: str):
    labels = jnp.asarray(batch[key])
    if integer and not jnp.issubdtype(labels.dtype, jnp.integer):
        raise LossError(
            f"loss term {term_name!r} needs integer class labels in batch[{key!r}], got dtype "
            f"{labels.dtype}; convert them with .astype('int32')"
        )
    return labels


def _check_shapes(term_name: str, outputs, targets, key: str, *, drop_last: bool):
    expected = outputs.shape[:-1] if drop_last else outputs.shape
    if targets.shape != expected:
        raise LossError(
            f"loss term {term_name!r}: batch[{key!r}] has shape {targets.shape} but the model "
            f"outputs have shape {outputs.shape}; expected labels of shape {expected}"
        )


def softmax_cross_entropy(
    *, name: str = "ce", labels: str = "y", label_smoothing: float = 0.0, where: Where = None
) -> Term:
    """Cross-entropy of logits ``(..., C)`` against integer labels ``(...)``, with smoothing."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    def fn(logits, batch):
        y = _labels(batch, labels, integer=True, term_name=name)
        _check_shapes(name, logits, y, labels, drop_last=True)
        logits = logits.astype(jnp.float32)
        if label_smoothing == 0.0:
            return optax.softmax_cross_entropy_with_integer_labels(logits, y)
        num_classes = logits.shape[-1]
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)

    return term(fn, name=name, where=where)


def sigmoid_binary_cross_entropy(
    *, name: str = "bce", labels: str = "y", where: Where = None
) -> Term:
    """Binary cross-entropy of logits against 0/1 labels of the same shape, summed per example."""

    def fn(logits, batch):
        y = jnp.asarray(batch[labels])
        _check_shapes(name, logits, y, labels, drop_last=False)
        values = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), y)
        return values.reshape(values.shape[0], -1).sum(-1)

    return term(fn, name=name, where=where)


def mse(*, name: str = "mse", targets: str = "y", where: Where = None) -> Term:
    """Squared error, averaged over each example's non-batch axes."""

    def fn(preds, batch):
        y = jnp.asarray(batch[targets])
        _check_shapes(name, preds, y, targets, drop_last=False)
        err = (preds.astype(jnp.float32) - y) ** 2
        return err.reshape(err.shape[0], -1).mean(-1)

    return term(fn, name=name, where=where)


def huber(*, name: str = "huber", targets: str = "y", delta: float = 1.0, where: Where = None):
    """Huber loss with threshold ``delta``, averaged over each example's non-batch axes."""

    def fn(preds, batch):
        y = jnp.asarray(batch[targets])
        _check_shapes(name, preds, y, targets, drop_last=False)
        values = optax.huber_loss(preds.astype(jnp.float32), y, delta=delta)
        return values.reshape(values.shape[0], -1).mean(-1)

    return term(fn, name=name, where=where)


def z_loss(*, name: str = "z_loss", where: Where = None) -> Term:
    """``logsumexp(logits)**2`` per example (or token): keeps logits from drifting (PaLM)."""

    def fn(logits, batch):
        del batch
        return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2

    return term(fn, name=name, where=where)


def _is_kernel(path, leaf) -> bool:
    del path
    return jnp.ndim(leaf) >= 2


def l2(*, name: str = "l2", mask: Callable[[str, Any], bool] | Any = None) -> Term:
    """``0.5 * sum(p**2)`` over a subset of the parameters.

    Args:
      mask: ``(path, leaf) -> bool`` where ``path`` is like ``"dense0/kernel"``, or
        a pytree of bools shaped like the params. Default: matrices and
        higher-rank leaves (kernels and embeddings, not biases or norm scales).
    """
    select = _is_kernel if mask is None else mask

    def fn(params):
        if callable(select):
            flat, _ = jax.tree_util.tree_flatten_with_path(params)
            chosen = [leaf for path, leaf in flat if select(path_str(path), leaf)]
        else:
            try:
                chosen = [
                    leaf
                    for leaf, keep in zip(
                        jax.tree_util.tree_leaves(params),
                        jax.tree_util.tree_leaves(
                            jax.tree_util.tree_map(lambda _, m: m, params, select)
                        ),
                        strict=True,
                    )
                    if keep
                ]
            except ValueError as e:
                raise LossError(
                    f"l2 term {name!r}: the mask pytree does not match the params: {e}"
                ) from None
        if not chosen:
            return jnp.zeros((), jnp.float32)
        return 0.5 * sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in chosen)

    return term(fn, name=name, on="params")
