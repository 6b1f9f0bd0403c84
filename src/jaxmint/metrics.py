"""Per-example evaluation metrics: ``fn(outputs, batch) -> per-example values``.

Metrics are averaged over the unmasked examples of the evaluation set and logged
as ``eval/<name>`` (and as ``<name>`` on training log steps).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

Metric = Callable[..., jnp.ndarray]


def accuracy(labels: str = "y") -> Metric:
    """Fraction of examples (or tokens) whose arg-max logit equals the integer label."""

    def fn(logits, batch):
        return (jnp.argmax(logits, axis=-1) == batch[labels]).astype(jnp.float32)

    return fn


def mean_absolute_error(targets: str = "y") -> Metric:
    """Mean absolute error over each example's non-batch axes."""

    def fn(preds, batch):
        err = jnp.abs(preds - batch[targets])
        return err.reshape(err.shape[0], -1).mean(-1)

    return fn


__all__ = ["Metric", "accuracy", "mean_absolute_error"]
