"""Strategies: how one pure train step is laid out on devices and hosts.

- ``single``: one device.
- ``data``: a 1-D device mesh named ``data``; the batch is sharded on its leading
  axis, the state replicated; XLA inserts the gradient all-reduce.
- ``fsdp``: like ``data``, and each parameter and optimizer-state leaf is sharded
  along its largest dimension divisible by the device count (others stay
  replicated); XLA gathers them where needed.
- ``pmap``: per-device programs through ``jax.shard_map``: the step sees its
  device's slice of the batch, and gradients, metrics and batch statistics are
  averaged with ``pmean`` over the axis ``data`` — so per-device code such as
  cross-replica batch norm (``axis_name="data"``) can be written.
- ``auto``: ``single`` on one device, ``data`` otherwise.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmint.data import DataError

AXIS = "data"


def resolve(strategy: str) -> str:
    if strategy == "auto":
        return "single" if jax.device_count() == 1 else "data"
    return strategy


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``data`` over all devices (of every process)."""
    devices = list(devices if devices is not None else jax.devices())
    axis_type = getattr(jax.sharding, "AxisType", None)
    kwargs = {"axis_types": (axis_type.Auto,)} if axis_type is not None else {}
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices, **kwargs)


def check_batch(batch_size: int, grad_accum: int, strategy: str) -> None:
    """Fail early, with the numbers and valid choices, when the batch does not divide."""
    n = jax.device_count()
    if strategy == "single" or n == 1:
        return
    per_step = batch_size // grad_accum
    if batch_size % n or per_step % n:
        valid = [b for b in range(n, 4 * max(batch_size, n) + 1, n * grad_accum)][:6]
        raise DataError(
            f"strategy {strategy!r} splits each batch over {n} devices, but batch_size="
            f"{batch_size} (micro-batch {per_step} with grad_accum={grad_accum}) is not "
            f"divisible by {n}; choose a batch size such as {valid}"
        )
    if jax.process_count() > 1 and batch_size % jax.process_count():
        raise DataError(
            f"batch_size={batch_size} must be divisible by the {jax.process_count()} processes"
        )


def fsdp_spec(shape, n: int) -> P:
    """Shard the largest dimension divisible by ``n``; replicate if there is none."""
    dims = [(size, i) for i, size in enumerate(shape) if size % n == 0 and size >= n]
    if not dims:
        return P()
    _, axis = max(dims)
    spec = [None] * len(shape)
    spec[axis] = AXIS
    return P(*spec)


def state_shardings(state, mesh: Mesh, strategy: str):
    """Shardings for every leaf of the train state under ``strategy``."""
    replicated = NamedSharding(mesh, P())
    if strategy != "fsdp":
        return jax.tree_util.tree_map(lambda _: replicated, state)
    n = mesh.size

    def shard(leaf):
        return NamedSharding(mesh, fsdp_spec(np.shape(leaf), n))

    return state._replace(
        params=jax.tree_util.tree_map(shard, state.params),
        opt_state=jax.tree_util.tree_map(shard, state.opt_state),
        **{
            f: jax.tree_util.tree_map(lambda _: replicated, getattr(state, f))
            for f in ("step", "model_state", "loss_state", "rng", "guard")
        },
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def to_global(batch, sharding: NamedSharding):
    """Put a batch on the mesh: the local rows of this process become a global array."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def to_host(tree):
    """Fetch a (possibly multi-process, replicated or sharded) pytree as numpy."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def fetch(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_replicated:
            return np.asarray(x.addressable_shards[0].data)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(fetch, tree)


def compile_steps(steps, strategy: str, mesh: Mesh | None, shardings):
    """``(train_step, eval_step)`` jitted for ``strategy`` (train_step donates its state)."""
    if strategy == "single":
        return (jax.jit(steps.train_step, donate_argnums=0), jax.jit(steps.eval_step))
    replicated = NamedSharding(mesh, P())
    data = batch_sharding(mesh)
    if strategy in ("data", "fsdp"):
        train = jax.jit(
            steps.train_step,
            in_shardings=(shardings, data),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )
        evaluate = jax.jit(
            steps.eval_step, in_shardings=(shardings, data, replicated), out_shardings=replicated
        )
        return train, evaluate
    # pmap: per-device programs; the step itself pmeans over AXIS (build_steps(axis_name=...)).
    train = jax.jit(
        jax.shard_map(
            steps.train_step,
            mesh=mesh,
            in_specs=(P(), P(AXIS)),
            out_specs=(P(), P()),
            check_vma=False,
        ),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        jax.shard_map(
            steps.eval_step,
            mesh=mesh,
            in_specs=(P(), P(AXIS), P()),
            out_specs=P(),
            check_vma=False,
        )
    )
    return train, evaluate
