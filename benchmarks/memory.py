"""Memory of a transformer's train step: rematerialization policies, and meshes.

Run (a few minutes on 2 CPU cores for the default ~100M-parameter model;
``--quick`` is a few-second run on a tiny one)::

    python benchmarks/memory.py
    python benchmarks/memory.py --quick
    python benchmarks/memory.py --scan-layers --mesh-remat full  # scanned blocks, remat
    python benchmarks/memory.py --scan-layers --mesh-remat full --chunked-ce --chunked-attention

Two measures per policy of `jaxmint.models.transformer(..., remat=...)`, for the
gradient of the next-token loss at one batch:

* **kept for backward**: the bytes of the residuals the forward pass keeps for the
  backward pass (the leaves of ``jax.vjp``'s closure, from ``jax.eval_shape``:
  nothing is computed). This is the activation memory rematerialization trades
  for compute, whatever the device. Target: ``full`` / ``none`` **<= 0.5**.
* **XLA temp**: the compiled gradient's temporary buffers from XLA's
  ``memory_analysis()`` on this machine's first device (``--no-compile`` skips
  it). On a CPU, XLA drops the barriers that keep the recomputation late, so this
  may not fall there; run it on an accelerator to see the peak move.

And per mesh of 8 devices (8 fake CPU devices in a child process when this
process has fewer): `fit`'s whole train step (adamw, the state donated) laid out
by the default rules, compiled, and XLA's ``memory_analysis()`` of one device:
arguments + outputs + temporaries - aliased (donated) bytes. Target: the
``fsdp=2,tensor=4`` mesh at **<= 0.2** of ``data=8`` (data parallelism keeps a
whole copy of the parameters and Adam's two moments on every device). Both meshes
take the same global batch, so each device of ``fsdp=2,tensor=4`` computes four
times the examples of one of ``data=8``; the state's share is reported apart. The
mesh table runs twice: at the model's full sequence length, and at an eighth of it,
where activations weigh less against the state. On CPU devices each mesh is planned
under XLA's default CPU schedule (ordered for concurrency) and under its
memory-optimized one (ordered for memory, as accelerator compilers do under their
memory limit); on 8 accelerators, under the backend's own. ``--scan-layers`` plans
the transformer with its blocks scanned (``scan_layers=True``), and ``--mesh-remat``
gives the mesh table's model a remat policy. ``--chunked-ce`` trains it on
`jaxmint.losses.chunked_cross_entropy` (no whole logits) instead of the plain
cross-entropy, and ``--chunked-attention`` gives it `jaxmint.models.chunked_attention`.

Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from _common import environment, table, write_result

import jaxmint
from jaxmint.models._remat import POLICIES

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_FULL_OVER_NONE = 0.5
TARGET_MESH = 0.2
SHORT = 8  # the mesh table also runs on sequences this many times shorter
MESHES = ("data=8", "fsdp=8", "fsdp=2,tensor=4", "fsdp=4,tensor=2")
SIZES = {
    "100m": dict(vocab=32_000, length=1024, d_model=768, layers=12, heads=12, batch=8),
    "tiny": dict(vocab=256, length=64, d_model=64, layers=2, heads=4, batch=8),
}


# The mesh table's model and loss: the plain transformer and cross-entropy by default.
VARIANT = {"scan_layers": False, "remat": "none", "chunked_ce": False, "chunked_attention": False}

# Every program here is compiled for its memory plan only, never run: XLA plans
# buffers before code generation, so LLVM's optimizations are switched off (the same
# bytes, a third less compile time).
PLAN_ONLY = {"xla_backend_optimization_level": 0}


def measure(size: str, policy: str, compile_: bool, scan_layers: bool = False) -> dict:
    vocab, length, d_model, layers, heads, batch = SIZES[size].values()
    model = jaxmint.models.transformer(
        vocab,
        max_len=length,
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        remat=policy,
        scan_layers=scan_layers,
    )
    tokens = jax.ShapeDtypeStruct((batch, length + 1), np.int32)
    params = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((batch, length), np.int32)
    )

    def loss(p, t):
        logits = model.apply(p, t[:, :-1], train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

    backward = jax.eval_shape(lambda p, t: jax.vjp(lambda q: loss(q, t), p)[1], params, tokens)
    nbytes = lambda tree: int(
        sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
    )
    row = {"params": nbytes(params) // 4, "kept_for_backward_bytes": nbytes(backward)}
    if compile_:
        t0 = time.perf_counter()
        compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile(PLAN_ONLY)
        row["xla_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
        row["compile_s"] = time.perf_counter() - t0
    return row


def mesh_memory(size: str, meshes, length: int | None = None, schedules=None, variant=None) -> dict:
    """Per schedule (name -> XLA compiler options; default: the backend's own) and
    mesh: the per-device bytes of `fit`'s compiled train step (see the docstring), on
    sequences of ``length`` tokens (default: the size's), for the model and loss of
    ``variant`` (`VARIANT`'s keys). Each mesh's step is lowered once and compiled once
    per schedule."""
    from jaxmint.steps import build_steps
    from jaxmint.train import _parallel as parallel
    from jaxmint.train._setup import param_axes

    schedules = schedules or {"backend": {}}
    variant = {**VARIANT, **(variant or {})}
    vocab, max_len, d_model, layers, heads, batch = SIZES[size].values()
    length = length or max_len
    attention = jaxmint.models.chunked_attention() if variant["chunked_attention"] else None
    model = jaxmint.models.transformer(
        vocab,
        max_len=length,
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        scan_layers=variant["scan_layers"],
        remat=variant["remat"],
        **({"attention": attention} if attention else {}),
    )
    losses = jaxmint.losses
    ce = losses.chunked_cross_entropy if variant["chunked_ce"] else losses.softmax_cross_entropy
    steps = build_steps(model, ce(), optax.adamw(1e-4))
    key = jax.random.PRNGKey(0)
    sample = {"x": np.zeros((batch, length), np.int32), "y": np.zeros((batch, length), np.int32)}
    abstract = jax.eval_shape(steps.init, key, sample)
    names = param_axes(model, key, sample["x"])
    out = {name: {} for name in schedules}
    for spec in meshes:
        mesh = parallel.layout("mesh", spec)
        shardings = parallel.state_shardings(abstract, mesh, "mesh", names)
        train, _ = parallel.compile_steps(steps, "mesh", mesh, shardings)
        batch_spec = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh))
            for k, v in sample.items()
        }
        lowered = train.lower(abstract, batch_spec)
        for name, options in schedules.items():
            t0 = time.perf_counter()
            stats = lowered.compile({**PLAN_ONLY, **options}).memory_analysis()
            parts = {
                "arguments": stats.argument_size_in_bytes,
                "outputs": stats.output_size_in_bytes,
                "temporaries": stats.temp_size_in_bytes,
                "aliased": stats.alias_size_in_bytes,
            }
            total = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
            seconds = time.perf_counter() - t0
            out[name][spec] = {**parts, "per_device_bytes": int(total), "compile_s": seconds}
    return out


# XLA's CPU compiler orders a program for concurrency by default: independent
# operations run side by side, which keeps more buffers alive at once than an order
# chosen for memory (as accelerator compilers choose under their memory limit). The
# mesh table is planned under both, every mesh under each (XLA compiler options).
SCHEDULES = {
    "default": {},
    "memory-optimized": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
}


def meshes_on_8_devices(
    size: str, lengths: tuple[int, ...], variant=None
) -> dict[str, dict[int, dict]]:
    """Per schedule and sequence length, `mesh_memory`: on 8 accelerators, here and
    with the backend's own schedule; else in a child of 8 fake CPU devices, under
    each CPU schedule (`SCHEDULES`)."""
    if jax.device_count() == 8 and jax.devices()[0].platform != "cpu":
        by_length = {n: mesh_memory(size, MESHES, n, None, variant) for n in lengths}
        return {"backend": {n: rows["backend"] for n, rows in by_length.items()}}
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import memory; print('MESHES', json.dumps([memory.mesh_memory("
        f"{size!r}, memory.MESHES, n, memory.SCHEDULES, {variant!r}) for n in {list(lengths)}]))"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if child.returncode != 0:
        raise RuntimeError(f"the 8-device child failed:\n{child.stderr[-3000:]}")
    line = next(x for x in child.stdout.splitlines() if x.startswith("MESHES "))
    by_length = dict(zip(lengths, json.loads(line[len("MESHES ") :]), strict=True))
    return {name: {n: rows[name] for n, rows in by_length.items()} for name in SCHEDULES}


def report_meshes(size: str, length: int, schedules: dict[str, dict]) -> None:
    """Add each mesh's ratios to data=8 to ``schedules[...]`` and print their table."""
    mib = lambda b: f"{b / 2**20:.1f}"
    for meshes in schedules.values():
        data = meshes["data=8"]
        for row in meshes.values():
            row["over_data"] = row["per_device_bytes"] / data["per_device_bytes"]
            row["arguments_over_data"] = row["arguments"] / data["arguments"]
    names = list(schedules)
    header = ["mesh", "state MiB", "/ data=8"]
    for name in names:
        header += [f"{name}: temporaries MiB", "total MiB", "/ data=8"]
    lines = []
    for spec, first in schedules[names[0]].items():
        line = [spec, mib(first["arguments"]), f"{first['arguments_over_data']:.3f}"]
        for name in names:
            row = schedules[name][spec]
            line += [
                mib(row["temporaries"]),
                mib(row["per_device_bytes"]),
                f"{row['over_data']:.3f}",
            ]
        lines.append(line)
    print()
    print(
        table(
            f"fit's train step (adamw) on 8 devices, per device, {size}, {length} tokens",
            header,
            lines,
        )
    )
    for name in names:
        mixed = schedules[name]["fsdp=2,tensor=4"]
        verdict = "met" if mixed["over_data"] <= TARGET_MESH else "MISSED"
        print(
            f"{length} tokens, {name} schedule: fsdp=2,tensor=4 / data=8: "
            f"{mixed['over_data']:.3f} (target <= {TARGET_MESH}: {verdict})"
        )
    mixed = schedules[names[0]]["fsdp=2,tensor=4"]
    print(
        f"The state alone (parameters, Adam's moments, the batch): "
        f"{mixed['arguments_over_data']:.3f}. At the same global batch each device of "
        "fsdp=2,tensor=4 computes 4 examples (tensor replicas share rows) where data=8 "
        "computes 1, so its activations are larger."
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip XLA's memory analysis")
    parser.add_argument(
        "--scan-layers",
        action="store_true",
        help="the transformer's blocks as one scan over stacked weights (scan_layers=True)",
    )
    parser.add_argument(
        "--mesh-remat",
        choices=sorted(POLICIES),
        default="none",
        help="the remat policy of the model in the mesh table",
    )
    parser.add_argument(
        "--chunked-ce",
        action="store_true",
        help="the mesh table's loss from the hidden states, a chunk of positions at a time "
        "(losses.chunked_cross_entropy) instead of from the whole logits",
    )
    parser.add_argument(
        "--chunked-attention",
        action="store_true",
        help="the mesh table's model scores attention 256 queries at a time "
        "(models.chunked_attention) instead of all at once",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args(argv)
    size = args.size or ("tiny" if args.quick else "100m")
    load_before = os.getloadavg()
    rows = {p: measure(size, p, not args.no_compile, args.scan_layers) for p in POLICIES}
    none = rows["none"]
    for row in rows.values():
        row["kept_ratio"] = row["kept_for_backward_bytes"] / none["kept_for_backward_bytes"]
        if "xla_temp_bytes" in row:
            row["xla_temp_ratio"] = row["xla_temp_bytes"] / none["xla_temp_bytes"]
    mib = lambda b: f"{b / 2**20:.1f}"
    header = ["remat", "kept for backward MiB", "ratio"]
    if not args.no_compile:
        header += ["XLA temp MiB", "ratio"]
    lines = []
    for policy, row in rows.items():
        line = [policy, mib(row["kept_for_backward_bytes"]), f"{row['kept_ratio']:.3f}"]
        if not args.no_compile:
            line += [mib(row["xla_temp_bytes"]), f"{row['xla_temp_ratio']:.3f}"]
        lines.append(line)
    device = jax.devices()[0]
    print(
        table(
            f"transformer {size} ({none['params'] / 1e6:.1f}M parameters), gradient of one batch, "
            f"on {device.platform}",
            header,
            lines,
        )
    )
    ratio = rows["full"]["kept_ratio"]
    verdict = "met" if ratio <= TARGET_FULL_OVER_NONE else "MISSED"
    print(
        f"\nfull / none, kept for backward: {ratio:.3f} "
        f"(target <= {TARGET_FULL_OVER_NONE}: {verdict})"
    )
    # The full sequence, where activations dominate the peak, and an eighth of it,
    # where they weigh less against the state (parameters, gradients, Adam's moments);
    # --quick plans the full one only.
    full_length = SIZES[size]["length"]
    lengths = (full_length,) if args.quick else (full_length, full_length // SHORT)
    variant = {
        "scan_layers": args.scan_layers,
        "remat": args.mesh_remat,
        "chunked_ce": args.chunked_ce,
        "chunked_attention": args.chunked_attention,
    }
    schedules = {} if args.no_compile else meshes_on_8_devices(size, lengths, variant)
    for length in lengths:
        if schedules:
            report_meshes(size, length, {name: rows[length] for name, rows in schedules.items()})
    headline = next(iter(schedules.values()), {})  # the default CPU schedule's, or the backend's
    meshes, short = (headline.get(n, {}) for n in (full_length, full_length // SHORT))
    ratio_of = lambda rows: rows["fsdp=2,tensor=4"]["over_data"] if rows else None
    result = {
        "benchmark": "memory",
        "size": size,
        "scan_layers": args.scan_layers,
        "mesh_remat": args.mesh_remat,
        "chunked_ce": args.chunked_ce,
        "chunked_attention": args.chunked_attention,
        "shape": SIZES[size],
        "remat": rows,
        "full_over_none_kept": ratio,
        "meshes": meshes,
        "fsdp_tensor_over_data": ratio_of(meshes),
        "short_length": full_length // SHORT,
        "meshes_short": short,
        "fsdp_tensor_over_data_short": ratio_of(short),
        "schedules": {
            name: {str(n): rows for n, rows in by_length.items()}
            for name, by_length in schedules.items()
        },
        "environment": {**environment(), "load_average_at_start": load_before},
    }
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
