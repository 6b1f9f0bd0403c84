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

A *mesh* generalizes ``data`` and ``fsdp``: ``mesh={"data": 2, "fsdp": 2, "tensor": 2}``
(or ``--mesh data=2,fsdp=2,tensor=2``, ``-1`` for the rest) is a device mesh over
`MESH_AXES`. The batch is sharded over ``data`` and ``fsdp``; activations that a
model constrains by position (``length``) over ``sequence``; a parameter with
logical axis names is split by the rules (`DEFAULT_RULES`), any other along its
largest dimension divisible by ``fsdp``'s size. ``data`` is the mesh ``data=-1``
and ``fsdp`` the mesh ``fsdp=-1``. With several processes the devices are laid out
process by process, so ``data`` spans hosts and the other axes stay inside one
where they fit.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmint.data import DataError
from jaxmint.models import activation_layout
from jaxmint.models._constrain import split_dims

AXIS = "data"
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
# The batch is split over these; sequence and tensor replicas share rows.
BATCH_AXES = ("data", "fsdp")
SHORTHANDS = {"data": {"data": -1}, "fsdp": {"fsdp": -1}}

# Logical axis name -> mesh axes. Megatron-style tensor parallelism: attention heads,
# the MLP's hidden axis and the vocabulary split over `tensor`; the model width over
# `fsdp`; sequence parallelism: positions over `sequence`, and the residual stream's
# positions over `tensor` too (Megatron's sequence parallelism, between the
# tensor-parallel layers). A name not listed (kv, norm) is not split.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": "sequence",
    "residual_length": ("sequence", "tensor"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
}


class MeshError(ValueError):
    """A mesh that is malformed or does not fit the devices."""


def resolve(strategy: str) -> str:
    if strategy == "auto":
        return "single" if jax.device_count() == 1 else "data"
    return strategy


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` or ``{"data": 2, "fsdp": -1}`` as a checked dict (sizes may be -1)."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            name, eq, size = part.strip().partition("=")
            try:
                items.append((name.strip(), int(size)))
            except ValueError:
                raise MeshError(
                    f"mesh {spec!r}: {part.strip()!r} is not AXIS=SIZE; write e.g. data=-1,fsdp=2"
                ) from None
            if not eq:
                raise MeshError(f"mesh {spec!r}: {part.strip()!r} is not AXIS=SIZE")
    axes: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise MeshError(
                f"mesh {spec!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}"
            )
        if name in axes:
            raise MeshError(f"mesh {spec!r}: axis {name!r} is given twice")
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise MeshError(f"mesh {spec!r}: the size of {name!r} must be a positive integer or -1")
        axes[name] = size
    if list(axes.values()).count(-1) > 1:
        raise MeshError(f"mesh {spec!r}: only one axis may be -1 (the rest of the devices)")
    if not axes:
        raise MeshError("the mesh names no axis; write e.g. data=-1,fsdp=2")
    return axes


def mesh_text(axes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in axes.items())


def mesh_shape(axes: Mapping[str, int], n: int) -> dict[str, int]:
    """Every axis of `MESH_AXES` with its size on ``n`` devices (-1 and absent filled in)."""
    known = math.prod(v for v in axes.values() if v != -1)
    shape = {a: axes.get(a, 1) for a in MESH_AXES}
    rest = next((a for a, v in axes.items() if v == -1), None)
    if rest is not None and n % known == 0:
        shape[rest] = n // known
    if math.prod(shape.values()) != n:
        names = list(axes)
        sizes = [d for d in range(1, n + 1) if n % d == 0]
        fits = [
            mesh_text(dict(zip(names, c, strict=True)))
            for c in itertools.product(sizes, repeat=len(names))
            if math.prod(c) == n
        ]
        raise MeshError(
            f"mesh {mesh_text(axes)} does not fit the {n} device{'s' * (n != 1)} (the sizes "
            f"multiply to {n}); meshes over {', '.join(names)} that do: {'; '.join(fits[:8])}"
        )
    return shape


def layout(strategy: str, mesh: str | Mapping[str, int] | None) -> Mesh | None:
    """The device mesh of ``strategy`` (None for one device); ``mesh`` for ``"mesh"``."""
    if strategy == "single":
        return None
    if strategy == "pmap":
        return make_mesh()
    axes = parse_mesh(mesh) if strategy == "mesh" else SHORTHANDS[strategy]
    return make_mesh(mesh_shape(axes, jax.device_count()))


def make_mesh(shape: Mapping[str, int] | None = None) -> Mesh:
    """A mesh over all devices (of every process): 1-D ``data`` by default, else ``shape``.

    Devices are laid out process by process (the first axis varies slowest), so with
    several hosts the leading ``data`` axis spans hosts and the last axes stay inside one.
    """
    devices = jax.devices()
    shape = dict(shape or {AXIS: len(devices)})
    axis_type = getattr(jax.sharding, "AxisType", None)
    kwargs = {"axis_types": (axis_type.Auto,) * len(shape)} if axis_type is not None else {}
    if jax.process_count() > 1:  # jax.devices() is ordered by process
        grid = np.array(devices).reshape(tuple(shape.values()))
        return Mesh(grid, tuple(shape), **kwargs)
    return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices, **kwargs)


def check_batch(batch_size: int, grad_accum: int, strategy: str, mesh: Mesh | None) -> None:
    """Fail early, with the numbers and valid choices, when the batch does not divide."""
    n = batch_shards(mesh)
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


def fsdp_spec(shape, n: int, axis_name: str = "fsdp") -> P:
    """Shard the largest dimension divisible by ``n`` over ``axis_name``; replicate if
    there is none."""
    dims = [(size, i) for i, size in enumerate(shape) if size % n == 0 and size >= n]
    if not dims:
        return P()
    _, axis = max(dims)
    spec = [None] * len(shape)
    spec[axis] = axis_name
    return P(*spec)


def logical_spec(names, shape, rules, sizes: dict[str, int]) -> P:
    """The PartitionSpec of a leaf with logical axis ``names``: each name's mesh axes by
    ``rules``, leaving out axes of size 1, axes already used, and any split that does
    not divide the dimension."""
    spec = split_dims(names, shape, rules, sizes)
    return P(*spec) if any(a is not None for a in spec) else P()  # nothing split: replicated


def state_shardings(state, mesh: Mesh, strategy: str, names=None, rules=None):
    """Shardings for every leaf of the train state on ``mesh``.

    A parameter with logical axis ``names`` (``{keystr(path): names}``) is split by
    ``rules`` (default `DEFAULT_RULES`); any other parameter along its largest
    dimension divisible by the ``fsdp`` axis. Optimizer-state leaves follow the
    parameter they mirror (same path suffix and shape); the rest is replicated.
    """
    replicated = NamedSharding(mesh, P())
    sizes = dict(mesh.shape)
    if strategy == "pmap" or math.prod(sizes.get(a, 1) for a in ("fsdp", "tensor")) == 1:
        return jax.tree_util.tree_map(lambda _: replicated, state)
    rules, names, n = DEFAULT_RULES if rules is None else rules, names or {}, sizes.get("fsdp", 1)

    def spec(key: str, shape) -> P:
        if key in names:
            return logical_spec(names[key], shape, rules, sizes)
        return fsdp_spec(shape, n) if n > 1 else P()

    flat, treedef = jax.tree_util.tree_flatten_with_path(state.params)
    by_key = {
        jax.tree_util.keystr(p): (np.shape(x), spec(jax.tree_util.keystr(p), np.shape(x)))
        for p, x in flat
    }
    params = treedef.unflatten(
        [NamedSharding(mesh, by_key[jax.tree_util.keystr(p)][1]) for p, _ in flat]
    )

    def mirror(path, leaf):
        # The longest parameter path that ends this leaf's path, with its shape: so
        # ['a']['kernel'] is not mistaken for a top-level ['kernel'] of the same shape.
        key, shape = jax.tree_util.keystr(path), np.shape(leaf)
        mirrored = [k for k, (s, _) in by_key.items() if key.endswith(k) and s == shape]
        if mirrored:
            return NamedSharding(mesh, by_key[max(mirrored, key=len)][1])
        return NamedSharding(mesh, fsdp_spec(shape, n) if n > 1 else P())

    return state._replace(
        params=params,
        opt_state=jax.tree_util.tree_map_with_path(mirror, state.opt_state),
        **{
            f: jax.tree_util.tree_map(lambda _: replicated, getattr(state, f))
            for f in ("step", "model_state", "loss_state", "rng", "guard")
        },
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch's leading axis split over the mesh's `BATCH_AXES` (all but ``tensor``)."""
    names = tuple(a for a in mesh.axis_names if a in BATCH_AXES)
    return NamedSharding(mesh, P(names if len(names) > 1 else names[0]))


def batch_shards(mesh: Mesh | None) -> int:
    """Into how many parts each batch is split."""
    if mesh is None:
        return 1
    return math.prod(n for a, n in dict(mesh.shape).items() if a in BATCH_AXES)


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


def compile_steps(steps, strategy: str, mesh: Mesh | None, shardings, rules=None):
    """``(train_step, eval_step)`` jitted for ``strategy`` (train_step donates its state).

    On a mesh, the steps trace inside `activation_layout`, so that the model's
    `jaxmint.models.constrain` calls lay its activations out by the ``rules``.
    """
    if strategy == "single":
        return (jax.jit(steps.train_step, donate_argnums=0), jax.jit(steps.eval_step))
    replicated = NamedSharding(mesh, P())
    data = batch_sharding(mesh)
    if strategy != "pmap":
        laid_out = _laid_out(mesh, DEFAULT_RULES if rules is None else rules)
        train = jax.jit(
            laid_out(steps.train_step),
            in_shardings=(shardings, data),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )
        evaluate = jax.jit(
            laid_out(steps.eval_step),
            in_shardings=(shardings, data, replicated),
            out_shardings=replicated,
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


def _laid_out(mesh: Mesh, rules):
    def wrap(fn):
        @functools.wraps(fn)
        def step(*args):
            with activation_layout(mesh, rules):
                return fn(*args)

        return step

    return wrap


def sharding_plan(params, names, mesh_sizes: Mapping[str, int], rules=None) -> list[dict]:
    """How each parameter of ``params`` (arrays or shape structs) is laid out on a mesh of
    ``mesh_sizes``, as `state_shardings` lays it out, without devices: one row per
    parameter with its logical axes, PartitionSpec, bytes and bytes per device."""
    rules = DEFAULT_RULES if rules is None else rules
    sizes = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
    split = math.prod(sizes.get(a, 1) for a in ("fsdp", "tensor")) > 1
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key, shape = jax.tree_util.keystr(path), tuple(np.shape(leaf))
        logical = names.get(key)
        if not split:
            spec = P()
        elif logical is not None:
            spec = logical_spec(logical, shape, rules, sizes)
        else:
            spec = fsdp_spec(shape, sizes["fsdp"]) if sizes["fsdp"] > 1 else P()
        parts = 1
        for entry in spec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                parts *= sizes[axis]
        total = math.prod(shape) * np.dtype(leaf.dtype).itemsize
        rows.append(
            {
                "parameter": key,
                "shape": shape,
                "logical": tuple(logical) if logical is not None else None,
                "spec": spec,
                "bytes": total,
                "bytes_per_device": total // parts,
            }
        )
    return rows
