"""The loss algebra: per-example terms combined with ``+``, ``*`` and named combinators.

A loss is a small tree of nodes. Constant weights and learnable weights live in
a *loss state* of arrays (``loss.init()``), and schedule weights are evaluated
on the traced step, so changing a weight never changes the compiled program.

The state is keyed by *name*, never by position: a weight by the name of what it
scales (``0.5 * sq`` is ``weights["sq"]``), the log-variances of
`uncertainty_weighted` by the names of the losses they weigh. Reordering terms
changes nothing; `Loss.resume_state` says what a resumed run changed.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Where = str | Callable[[Mapping[str, Any]], Any] | None
"""A mask: the name of a batch key, or ``batch -> bool array``, or None (all examples)."""

_SOURCES = ("outputs", "intermediates", "params", "inputs")
_REDUCTIONS = ("mean", "sum")


class LossError(ValueError):
    """A loss term returned something the algebra cannot reduce, or read a missing key."""


@dataclass(frozen=True)
class LossInputs:
    """Everything a loss term may read. Built by the train step; handy in tests."""

    outputs: Any
    batch: Mapping[str, Any]
    params: Any = None
    intermediates: Mapping[str, Any] = field(default_factory=dict)
    step: Any = 0

    @property
    def batch_size(self) -> int:
        leaves = jax.tree_util.tree_leaves(self.batch)
        if not leaves:
            raise LossError("the batch is empty: a batch is a dict of arrays with a batch axis")
        return int(np.shape(leaves[0])[0])


class Loss:
    """Base of every node in the loss algebra."""

    # -- algebra ---------------------------------------------------------------
    def __add__(self, other: Loss) -> Loss:
        if isinstance(other, numbers.Number) and other == 0:
            return self  # lets sum() start from 0
        if not isinstance(other, Loss):
            return NotImplemented
        left = self.children if isinstance(self, Sum) else (self,)
        right = other.children if isinstance(other, Sum) else (other,)
        return Sum(left + right)

    __radd__ = __add__

    def __mul__(self, weight) -> Loss:
        if isinstance(weight, Loss):
            raise TypeError("a loss can be scaled by a number or a schedule, not by another loss")
        if callable(weight) or isinstance(weight, numbers.Number | np.ndarray | jax.Array):
            return Scaled(weight, self)
        return NotImplemented

    __rmul__ = __mul__

    def __neg__(self) -> Loss:
        return Scaled(-1.0, self)

    def __sub__(self, other: Loss) -> Loss:
        return self + (-other)

    # -- structure -------------------------------------------------------------
    children: tuple[Loss, ...] = ()

    def walk(self) -> Iterator[Loss]:
        """Yield this node and its descendants, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    @property
    def label(self) -> str:
        """A name for this node built from the names below it; keys its loss state."""
        raise NotImplementedError

    @property
    def term_names(self) -> list[str]:
        """The names of every `Term` in this loss, in evaluation order."""
        return [node.name for node in self.walk() if isinstance(node, Term)]

    @property
    def regularizer_names(self) -> list[str]:
        """The terms that read the parameters (``on="params"``): regularizers."""
        return [n.name for n in self.walk() if isinstance(n, Term) and n.on == "params"]

    def metric_names(self) -> list[str]:
        """The ``loss/<name>`` metrics this loss logs (terms and named combinations)."""
        names = [n.name for n in self.walk() if isinstance(n, Term | Named)]
        seen = set()
        for n in names:
            if n in seen:
                raise LossError(
                    f"two loss terms or combinations are both named {n!r}; every name is "
                    "logged as its own metric 'loss/<name>', so give each a distinct name"
                )
            seen.add(n)
        return names

    def init(self) -> dict:
        """The loss state: constant weights and learnable parameters, as arrays, by name."""
        self.metric_names()  # fail early on clashing names
        weights, params = {}, {}
        for node in self.walk():
            for part, new in ((weights, node._init_weights()), (params, node._init_params())):
                clash = set(part) & set(new)
                if clash:
                    raise LossError(
                        f"two parts of the loss are both keyed {sorted(clash)}; give the terms "
                        "distinct names"
                    )
                part.update(new)
        return {"weights": weights, "params": params}

    def _init_weights(self) -> dict:
        return {}

    def _init_params(self) -> dict:
        return {}

    def resume_state(self, stored: Mapping, stored_terms: list[str] | None) -> tuple[dict, list]:
        """The loss state a resumed run continues with, and what changed, in sentences.

        ``stored`` is the checkpoint's loss state and ``stored_terms`` its term
        names. Constant weights always come from the code (a changed one is named,
        old and new); learned parameters (and their optimizer state) come from the
        checkpoint, matched by name. A change that leaves learned parameters
        without a match raises `LossError`.
        """
        fresh = self.init()
        notes = []
        if stored_terms is not None:
            old, new = set(stored_terms), set(self.term_names)
            notes += [f"loss term removed: {n!r}" for n in sorted(old - new)]
            notes += [f"loss term added: {n!r}" for n in sorted(new - old)]
        old_w = {k: float(v) for k, v in stored.get("weights", {}).items()}
        for key, value in fresh["weights"].items():
            before = old_w.get(key, 1.0 if stored_terms and key in stored_terms else None)
            if before is not None and before != float(value):
                notes.append(
                    f"loss weight {key!r} changed: {before} -> {float(value)} "
                    "(the code's weight is used)"
                )
        for key, before in old_w.items():
            if key not in fresh["weights"] and key in self.term_names and before != 1.0:
                notes.append(f"loss weight {key!r} changed: {before} -> 1.0 (the code's weight)")
        old_p, new_p = stored.get("params", {}), fresh["params"]
        legacy = self._from_positional(old_p, stored_terms)
        if legacy is not None:
            notes.append(
                "learned loss weights read from an older checkpoint layout (keyed by position); "
                "their optimizer state starts afresh"
            )
            return {"weights": fresh["weights"], "params": legacy}, notes
        if _structure(old_p) != _structure(new_p):
            raise LossError(
                "the checkpoint holds learned loss parameters for "
                f"{_describe_params(old_p)}, but the loss in the code learns "
                f"{_describe_params(new_p)}: a term was added, removed or renamed inside a "
                "learned weighting, so its learned weights cannot be matched. Keep those terms "
                "as they were, or start over with --fresh (fit(..., fresh=True)), which moves "
                "the old checkpoints aside, or use a new --workdir."
            )
        state = {"weights": fresh["weights"], "params": old_p}
        if "opt_state" in stored:
            state["opt_state"] = stored["opt_state"]
        return state, notes

    def _from_positional(self, old: Mapping, stored_terms: list[str] | None) -> dict | None:
        """Learned parameters of a checkpoint keyed by tree position (``{"r": [s0, s1]}``)
        under today's names, where the mapping is unambiguous; else None.

        Unambiguous: one learned weighting then and now, over the same number of
        plain terms, all of which the checkpoint names (their order there is the
        order of the stored array).
        """
        if len(old) != 1 or stored_terms is None:
            return None
        (values,) = old.values()
        nodes = [n for n in self.walk() if isinstance(n, UncertaintyWeighted)]
        if isinstance(values, Mapping) or len(nodes) != 1:
            return None
        (node,) = nodes
        labels = [c.label for c in node.children]
        if (
            np.shape(values) != (len(labels),)
            or not all(isinstance(c, Term) for c in node.children)
            or not set(labels) <= set(stored_terms)
        ):
            return None
        old_order = sorted(labels, key=stored_terms.index)
        values = np.asarray(values, np.float32)
        return {node.label: {name: jnp.asarray(values[old_order.index(name)]) for name in labels}}

    # -- evaluation ------------------------------------------------------------
    def __call__(
        self, inputs: LossInputs, state: Mapping | None = None, *, where=None
    ) -> tuple[jax.Array, dict]:
        """Evaluate to ``(total, metrics)``; ``metrics`` maps ``loss/<name>`` to scalars.

        ``where`` optionally masks whole examples (shape ``(B,)``) for every term.
        """
        state = self.init() if state is None else state
        metrics: dict[str, jax.Array] = {}
        mask = None if where is None else jnp.asarray(where).astype(bool)
        total = self._evaluate(inputs, state, mask, metrics)
        total = jnp.asarray(total)
        if total.shape != ():
            raise LossError(f"the total loss must be a scalar, got shape {total.shape}")
        return total, metrics

    def _evaluate(self, inputs, state, where, metrics) -> jax.Array:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Term(Loss):
    """A named loss term from ``fn``; see `term`."""

    fn: Callable
    name: str
    on: str = "outputs"
    reduction: str = "mean"
    where: Where = None

    @property
    def label(self) -> str:
        return self.name

    def _evaluate(self, inputs, state, where, metrics):
        if self.on == "params":
            value = jnp.asarray(self.fn(inputs.params))
            if value.shape != ():
                raise LossError(
                    f"loss term {self.name!r} reads params and must return a scalar, "
                    f"got shape {value.shape}"
                )
        else:
            source = inputs.outputs if self.on == "outputs" else inputs.intermediates
            try:
                if self.on == "inputs":
                    values = jnp.asarray(self.fn(inputs))
                else:
                    values = jnp.asarray(self.fn(source, inputs.batch))
            except KeyError as e:
                raise LossError(
                    f"loss term {self.name!r} reads key {e.args[0]!r}, which is missing; "
                    f"{_describe_keys(self.on, source, inputs.batch)}"
                ) from None
            value = self._reduce(values, inputs, _and(_mask(self.where, inputs), where))
        metrics[f"loss/{self.name}"] = value
        return value

    def _reduce(self, values, inputs, mask):
        batch = inputs.batch_size
        if values.ndim == 0 or values.shape[0] != batch:
            raise LossError(
                f"loss term {self.name!r} must return per-example values with a leading "
                f"batch axis of size {batch}, got shape {values.shape}. Return one value per "
                "example (do not reduce with .mean()); the term reduces them "
                f"(reduction={self.reduction!r})."
            )
        values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
        if self.reduction == "sum":
            # Sum over non-batch axes, mean over examples: stable under batch size changes.
            if mask is None:
                return jnp.sum(values) / batch
            m = jnp.broadcast_to(_broadcast(mask, values), values.shape).astype(values.dtype)
            # An example counts when any of its values is unmasked.
            examples = jnp.sum(jnp.max(m.reshape(batch, -1), axis=1))
            return jnp.sum(values * m) / jnp.maximum(examples, 1.0)
        if mask is None:
            return jnp.mean(values)
        m = jnp.broadcast_to(_broadcast(mask, values), values.shape).astype(values.dtype)
        return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


@dataclass(frozen=True, eq=False)
class Sum(Loss):
    """The sum of several losses; what ``a + b`` builds."""

    children: tuple[Loss, ...]

    def __post_init__(self):
        self.metric_names()  # two parts with one name: an error as the loss is built

    @property
    def label(self) -> str:
        return "+".join(sorted(c.label for c in self.children))  # order does not matter

    def _evaluate(self, inputs, state, where, metrics):
        return sum(c._evaluate(inputs, state, where, metrics) for c in self.children)


@dataclass(frozen=True, eq=False)
class Scaled(Loss):
    """A loss times a constant or a schedule ``step -> weight``; what ``w * a`` builds."""

    weight: Any
    child: Loss

    @property
    def children(self):
        return (self.child,)

    @property
    def label(self) -> str:
        return f"w*{self.child.label}"

    def _init_weights(self):
        if callable(self.weight):
            return {}
        return {self.child.label: jnp.asarray(self.weight, jnp.float32)}

    def _evaluate(self, inputs, state, where, metrics):
        if callable(self.weight):
            weight = jnp.asarray(self.weight(inputs.step), jnp.float32)
        else:
            weight = state["weights"][self.child.label]
        if isinstance(self.child, Term | Named):
            metrics[f"weight/{self.child.name}"] = weight
        return weight * self.child._evaluate(inputs, state, where, metrics)


@dataclass(frozen=True, eq=False)
class Named(Loss):
    """A combination logged under its own name as ``loss/<name>``; see `named`."""

    name: str
    child: Loss

    def __post_init__(self):
        self.metric_names()  # two parts with one name: an error as the loss is built

    @property
    def children(self):
        return (self.child,)

    @property
    def label(self) -> str:
        return self.name

    def _evaluate(self, inputs, state, where, metrics):
        value = self.child._evaluate(inputs, state, where, metrics)
        metrics[f"loss/{self.name}"] = value
        return value


@dataclass(frozen=True, eq=False)
class StopGradient(Loss):
    """A loss whose value counts in the total but sends no gradient; see `stop_gradient`."""

    child: Loss

    @property
    def children(self):
        return (self.child,)

    @property
    def label(self) -> str:
        return f"stop_gradient({self.child.label})"

    def _evaluate(self, inputs, state, where, metrics):
        inner: dict = {}
        value = self.child._evaluate(inputs, state, where, inner)
        metrics.update(jax.lax.stop_gradient(inner))
        return jax.lax.stop_gradient(value)


@dataclass(frozen=True, eq=False)
class Masked(Loss):
    """A loss evaluated only where ``where`` holds; see `masked`."""

    child: Loss
    where: Where

    @property
    def children(self):
        return (self.child,)

    @property
    def label(self) -> str:
        return f"masked({self.child.label})"

    def _evaluate(self, inputs, state, where, metrics):
        mask = _and(_mask(self.where, inputs), where)
        return self.child._evaluate(inputs, state, mask, metrics)


@dataclass(frozen=True, eq=False)
class UncertaintyWeighted(Loss):
    """Learned homoscedastic-uncertainty weighting; see `uncertainty_weighted`."""

    children: tuple[Loss, ...]

    def __post_init__(self):
        self.metric_names()  # two parts with one name: an error as the loss is built

    def _names(self) -> list[str]:
        """The logged name of each weighed loss (its innermost name)."""

        def name(node):
            while isinstance(node, Scaled | Masked | StopGradient):
                node = node.children[0]
            return getattr(node, "name", node.label)

        return [name(c) for c in self.children]

    @property
    def label(self) -> str:
        return f"uncertainty({','.join(sorted(c.label for c in self.children))})"

    def _init_params(self):
        # One log-variance per weighed loss, keyed by its label: order does not matter.
        return {self.label: {c.label: jnp.zeros((), jnp.float32) for c in self.children}}

    def _evaluate(self, inputs, state, where, metrics):
        log_vars = state["params"][self.label]
        total = 0.0
        for child, name in zip(self.children, self._names(), strict=True):
            value = child._evaluate(inputs, state, where, metrics)
            log_var = log_vars[child.label]
            precision = 0.5 * jnp.exp(-log_var)
            metrics[f"weight/{name}"] = precision
            total = total + precision * value + 0.5 * log_var
        return total


# -- constructors --------------------------------------------------------------


def term(
    fn: Callable,
    *,
    name: str,
    on: str = "outputs",
    reduction: str = "mean",
    where: Where = None,
) -> Term:
    """Turn ``fn`` into a named loss term.

    Args:
      fn: for ``on="outputs"``, ``fn(outputs, batch) -> per-example values`` (leading
        batch axis; extra axes such as tokens are fine); for ``on="intermediates"``,
        ``fn(intermediates, batch)`` with the model's sown activations; for
        ``on="params"``, ``fn(params) -> scalar`` (a regularizer); for ``on="inputs"``,
        ``fn(inputs) -> per-example values`` with the whole `LossInputs` (outputs,
        batch, params, intermediates, step), for a term that reads several of them.
      name: logged as ``loss/<name>``.
      reduction: ``"mean"`` over every unmasked value, or ``"sum"`` over non-batch
        axes then mean over examples.
      where: a mask — a batch key or ``batch -> bool array`` of shape ``(B,)`` or
        the values' leading shape; masked values count neither in the numerator
        nor the denominator of the mean.

    Example::

        hinge = term(lambda out, b: jnp.maximum(0, 1 - out * b["y"]).sum(-1), name="hinge")
        loss = hinge + 0.01 * jaxmint.losses.l2()
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a loss term needs a non-empty name without '/', got {name!r}")
    if on not in _SOURCES:
        raise ValueError(f"on={on!r} is not one of {_SOURCES}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {_REDUCTIONS}")
    return Term(fn, name, on, reduction, where)


def named(loss: Loss, name: str) -> Named:
    """Log the combination ``loss`` under ``loss/<name>`` as well as its terms."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a named combination needs a name without '/', got {name!r}")
    return Named(name, loss)


def stop_gradient(loss: Loss) -> StopGradient:
    """Keep ``loss`` in the total and the logs but send no gradient through it."""
    return StopGradient(loss)


def masked(loss: Loss, where: Where) -> Masked:
    """Evaluate every term of ``loss`` only on examples (or tokens) where ``where`` holds."""
    return Masked(loss, where)


def uncertainty_weighted(*losses: Loss) -> UncertaintyWeighted:
    """Weight losses by learned homoscedastic uncertainty (Kendall, Gal & Cipolla, 2018).

    The total is ``sum_i 0.5 * exp(-s_i) * L_i + 0.5 * s_i`` with one learnable
    log-variance ``s_i`` per loss, trained with the model by the same optimizer.
    Each effective weight is logged as ``weight/<name>``.
    """
    if len(losses) < 2:
        raise ValueError("uncertainty_weighted needs at least two losses to weigh")
    return UncertaintyWeighted(tuple(losses))


# -- helpers -------------------------------------------------------------------


def _mask(where: Where, inputs: LossInputs):
    if where is None:
        return None
    if isinstance(where, str):
        if where not in inputs.batch:
            raise LossError(
                f"mask key {where!r} is not in the batch; batch keys are {sorted(inputs.batch)}"
            )
        return jnp.asarray(inputs.batch[where]).astype(bool)
    return jnp.asarray(where(inputs.batch)).astype(bool)


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return _broadcast(a, b) & _broadcast(b, a) if a.ndim != b.ndim else a & b


def _broadcast(mask, values):
    """Right-pad ``mask`` with unit axes so it broadcasts against ``values``."""
    extra = values.ndim - mask.ndim
    return mask.reshape(mask.shape + (1,) * extra) if extra > 0 else mask


def _structure(params) -> dict:
    """``{label: {child: shape}}`` of learned loss parameters, for comparison."""
    return {
        k: (
            {c: tuple(np.shape(v)) for c, v in children.items()}
            if isinstance(children, Mapping)
            else {"": tuple(np.shape(children))}  # an older, positional layout
        )
        for k, children in dict(params).items()
    }


def _describe_params(params) -> str:
    if not params:
        return "no terms"
    return "; ".join(
        f"{k} (terms {sorted(v) if isinstance(v, Mapping) else '?'})" for k, v in params.items()
    )


def _describe_keys(on, source, batch) -> str:
    text = f"the batch has keys {sorted(batch)}"
    if on in ("intermediates", "inputs"):
        text += f" and the model's intermediates have keys {sorted(source)}"
    return text
