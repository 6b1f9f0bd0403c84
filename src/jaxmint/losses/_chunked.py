"""Cross-entropy from the last hidden states, a chunk of positions at a time.

A language model's logits are its largest activation: ``batch x length x vocab``
floats, held once in the forward pass and once more as their gradient. This term
computes them from the hidden states and the output matrix itself, ``chunk``
positions at a time inside a `jax.lax.map` whose body is rematerialized, so no more
than one chunk's logits (and their gradient) exist at any moment. The model's own
logits output is then unused by the train step, and XLA drops its computation.
(The same idea as MaxText's vocabulary tiling and Levanter's blockwise
cross-entropy.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmint.losses._algebra import LossError, LossInputs, Term, Where, term
from jaxmint.losses._builtins import _labels
from jaxmint.models._constrain import constrain


def chunked_cross_entropy(
    *,
    hidden: str = "hidden",
    weight: str = "embed/embedding",
    layout: str = "VxD",
    chunk: int = 256,
    name: str = "ce",
    labels: str = "y",
    label_smoothing: float = 0.0,
    where: Where = None,
) -> Term:
    """Cross-entropy of the logits ``hidden @ weight.T`` against integer labels, computed
    ``chunk`` positions at a time: the same values and gradients as
    `softmax_cross_entropy` on the model's logits, without ever holding them whole.

    Args:
      hidden: the sown intermediate with the last hidden states ``(batch, length,
        width)`` (the built-in transformer sows ``"hidden"``, after its final norm).
      weight: the path of the output matrix in the parameters, ``/``-separated (the
        transformer's tied embedding: ``"embed/embedding"``). It has no bias.
      layout: the matrix's axes: ``"VxD"`` (vocab, width), as an embedding table, or
        ``"DxV"`` (width, vocab), as the kernel of an untied ``nn.Dense`` head
        (``weight="head/kernel", layout="DxV"``).
      chunk: positions per chunk; a length that is not a multiple is padded.
      label_smoothing: as `softmax_cross_entropy`'s (targets ``(1 - a) * one_hot + a / vocab``).

    Per device, the logits then cost one chunk (``batch x chunk x vocab``) instead of
    the whole sequence (as long as no other term and no train metric reads the
    model's outputs); `benchmarks/memory.py --chunked-ce` measures it. Use it for
    training: evaluation with it reads the same intermediates, and prediction and
    export run the model as it is, logits and all. Example::

        model = jaxmint.models.transformer(32_000, max_len=1024)
        loss = jaxmint.losses.chunked_cross_entropy(chunk=128)
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_cross_entropy: chunk must be a positive integer, got {chunk!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if layout not in ("VxD", "DxV"):
        raise ValueError(f"chunked_cross_entropy: layout must be 'VxD' or 'DxV', got {layout!r}")
    path = tuple(weight.split("/"))

    def fn(inputs: LossInputs):
        try:
            (h_BxLxD,) = _sown(inputs.intermediates[hidden])
        except KeyError:
            raise LossError(
                f"loss term {name!r} reads the intermediate {hidden!r}, which the model did not "
                f"sow (it sowed {sorted(inputs.intermediates)}); sow the last hidden states "
                f"under that name or pass hidden=<the name it has>"
            ) from None
        w = _param(inputs.params, path, name)
        w_VxD = w.T if layout == "DxV" and w.ndim == 2 else w
        y_BxL = _labels(inputs.batch, labels, integer=True, term_name=name)
        if h_BxLxD.ndim != 3 or w_VxD.ndim != 2 or h_BxLxD.shape[-1] != w_VxD.shape[-1]:
            matrix = "(width, vocab)" if layout == "DxV" else "(vocab, width)"
            hint = "" if layout == "DxV" else "; pass layout='DxV' for a (width, vocab) kernel"
            raise LossError(
                f"loss term {name!r}: the hidden states {hidden!r} have shape {h_BxLxD.shape} and "
                f"the output matrix {weight!r} {w.shape}; expected (batch, length, width) and "
                f"{matrix}{hint}"
            )
        if y_BxL.shape != h_BxLxD.shape[:2]:
            raise LossError(
                f"loss term {name!r}: batch[{labels!r}] has shape {y_BxL.shape} but the hidden "
                f"states have shape {h_BxLxD.shape}; expected labels of shape "
                f"{h_BxLxD.shape[:2]}"
            )
        h_BxLxD, w_VxD = h_BxLxD.astype(jnp.float32), w_VxD.astype(jnp.float32)
        return _chunked(h_BxLxD, w_VxD, y_BxL, chunk, label_smoothing)

    return term(fn, name=name, on="inputs", where=where)


def _sown(value):
    """A sown value (flax keeps a tuple of the calls' values) as a one-element tuple."""
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def _param(params, path: tuple[str, ...], name: str):
    node = params
    for i, key in enumerate(path):
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError):
            here = "/".join(path[:i]) or "the parameters"
            keys = sorted(node) if hasattr(node, "keys") else type(node).__name__
            raise LossError(
                f"loss term {name!r} reads the parameter {'/'.join(path)!r}, but {here} has no "
                f"{key!r} (it has {keys}); pass weight=<its path>"
            ) from None
    return jnp.asarray(node)


def _chunked(h_BxLxD, w_VxD, y_BxL, chunk: int, smoothing: float):
    """Per-position cross-entropy ``(batch, length)``, one rematerialized chunk at a time."""
    batch, length, width = h_BxLxD.shape
    chunk = min(chunk, length)
    count = -(-length // chunk)
    pad = count * chunk - length
    if pad:
        h_BxLxD = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0)))
        y_BxL = jnp.pad(y_BxL, ((0, 0), (0, pad)))
    h_NxBxCxD = h_BxLxD.reshape(batch, count, chunk, width).swapaxes(0, 1)
    y_NxBxC = y_BxL.reshape(batch, count, chunk).swapaxes(0, 1)

    @jax.checkpoint  # keep only the chunk's inputs: its logits are recomputed backward
    def one(xs):
        h_BxCxD, y_BxC = xs
        h_BxCxD = constrain(h_BxCxD, "batch", "length", "embed")
        logits_BxCxV = constrain(
            jnp.einsum("bcd,vd->bcv", h_BxCxD, w_VxD), "batch", "length", "vocab"
        )
        picked_BxC = jnp.take_along_axis(logits_BxCxV, y_BxC[..., None], axis=-1)[..., 0]
        ce_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1) - picked_BxC
        if smoothing:  # minus the smoothed targets' share: a * (mean logit - picked logit)
            ce_BxC -= smoothing * (jnp.mean(logits_BxCxV, axis=-1) - picked_BxC)
        return ce_BxC

    ce_NxBxC = jax.lax.map(one, (h_NxBxCxD, y_NxBxC))
    return ce_NxBxC.swapaxes(0, 1).reshape(batch, count * chunk)[:, :length]
