"""Memory of a transformer's train step under rematerialization policies.

Run (about a minute on 2 CPU cores for the default ~100M-parameter model;
``--quick`` is a few-second run on a tiny one)::

    python benchmarks/memory.py
    python benchmarks/memory.py --quick

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

Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import os
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
SIZES = {
    "100m": dict(vocab=32_000, length=1024, d_model=768, layers=12, heads=12, batch=8),
    "tiny": dict(vocab=256, length=64, d_model=64, layers=2, heads=4, batch=8),
}


def measure(size: str, policy: str, compile_: bool) -> dict:
    vocab, length, d_model, layers, heads, batch = SIZES[size].values()
    model = jaxmint.models.transformer(
        vocab, max_len=length, d_model=d_model, num_layers=layers, num_heads=heads, remat=policy
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
        compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
        row["xla_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
        row["compile_s"] = time.perf_counter() - t0
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip XLA's memory analysis")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args(argv)
    size = args.size or ("tiny" if args.quick else "100m")
    load_before = os.getloadavg()
    rows = {p: measure(size, p, not args.no_compile) for p in POLICIES}
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
    result = {
        "benchmark": "memory",
        "size": size,
        "shape": SIZES[size],
        "remat": rows,
        "full_over_none_kept": ratio,
        "environment": {**environment(), "load_average_at_start": load_before},
    }
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
