"""Grain pipelines over files against the in-memory loader, side by side.

Run (about 3 minutes and 9 GB of scratch disk on 2 idle CPU cores; ``--quick`` is a
smoke run of every code path, with a small "large" dataset and no memory limit)::

    python benchmarks/data.py            # full
    python benchmarks/data.py --quick    # what the test suite runs

Targets:

* (a) steps/s of `jaxmint.fit` reading ``.npy`` shards through its Grain pipeline
  (reader threads of the training process) / steps/s of `fit` on the same arrays
  in memory, on the digits data (an MLP 64-256-256-10, batch 64): **>= 0.9**. The
  same with one worker process, and with ArrayRecord and Parquet files, reported.
* (b) steps/s of a run whose ``.npy`` shards are 4x the process's address-space
  limit (``RLIMIT_AS``, ``--limit-mib``, 2000 MiB by default: a CPU training process
  needs about 1.7 GiB), read by one worker process, over the same run on a dataset
  that fits (the same rows, 1/64 of them), both in subprocesses: reported.

Every ratio compares variants measured in this run, interleaved round by round
(the order alternates), as medians over all logged intervals after the first
(which holds the compile). Results are printed and written to
``benchmarks/results/data.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import optax
from _common import environment, interval_rates, med, table, write_result

import jaxmint
from jaxmint import losses

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TRAINER = REPO / "tests" / "data" / "limited_trainer.py"
TARGET_GRAIN_OVER_MEMORY = 0.9
ROW_WIDTH = 1024  # float32 features per row of the large dataset: 4 KiB


def train(data, steps: int, log_every: int, workers: int = 0) -> list[float]:
    result = jaxmint.fit(
        jaxmint.models.mlp((256, 256), 10),
        losses.softmax_cross_entropy(),
        optax.adam(1e-3),
        data,
        steps=steps,
        batch_size=64,
        log_every=log_every,
        data_workers=workers,
        progress=False,
    )
    return interval_rates(result.history)


class SyntheticRows:
    """One column of the large dataset, made a slice at a time (never held whole)."""

    def __init__(self, n: int, width: int | None):
        self.shape = (n, width) if width else (n,)
        self.dtype = np.dtype(np.float32 if width else np.int32)

    def __getitem__(self, rows: slice) -> np.ndarray:
        index = np.arange(*rows.indices(self.shape[0]))
        if len(self.shape) == 1:
            return (index % 10).astype(np.int32)
        out = np.random.default_rng(index[:1]).random((len(index), self.shape[1]), np.float32)
        out[np.arange(len(index)), index % 10] += 3.0
        return out


def limited_run(shards: Path, steps: int, limit_mib: int) -> dict:
    out = subprocess.run(
        [sys.executable, str(TRAINER), str(shards), str(steps), str(limit_mib), "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=1200,
    )
    if out.returncode:
        raise SystemExit(f"the limited run failed:\n{out.stderr[-3000:]}")
    fields = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    return {"steps_per_sec": float(fields["STEPS_PER_SEC"]), "peak_mib": int(fields["PEAK_MIB"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run for the tests")
    parser.add_argument("--limit-mib", type=int, default=2000, help="RLIMIT_AS of part (b)")
    parser.add_argument("--scratch", default=None, help="folder for the datasets (default: tmp)")
    parser.add_argument("--out", type=Path, default=RESULTS / "data.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rounds, steps, log_every = (1, 40, 20) if args.quick else (5, 600, 100)

    scratch = Path(tempfile.mkdtemp(prefix="jaxmint-data-", dir=args.scratch))
    try:
        train_arrays, _ = jaxmint.data.digits()
        sources = {
            "npy": jaxmint.data.write_npy_shards(train_arrays, scratch / "npy"),
            "arrayrecord": jaxmint.data.write_array_record(train_arrays, scratch / "ar"),
            "parquet": jaxmint.data.write_parquet(
                train_arrays, scratch / "t.parquet", rows_per_group=256
            ),
        }
        variants = {
            "memory": lambda: train(train_arrays, steps, log_every),
            "grain_npy": lambda: train(sources["npy"], steps, log_every),
            "grain_npy_1_worker": lambda: train(sources["npy"], steps, log_every, workers=1),
            "grain_arrayrecord": lambda: train(sources["arrayrecord"], steps, log_every),
            "grain_parquet": lambda: train(sources["parquet"], steps, log_every),
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                rates[name] += variants[name]()
            print(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{k} {med(v):.0f}" for k, v in rates.items())
                + " steps/s",
                flush=True,
            )
        m = {k: med(v) for k, v in rates.items()}
        ratios = {k: m[k] / m["memory"] for k in variants if k != "memory"}

        # (b) a dataset 4x the address-space limit (in --quick: small, no limit)
        limit = 0 if args.quick else args.limit_mib
        big_mib = 64 if args.quick else 4 * args.limit_mib
        n = (big_mib << 20) // (4 * ROW_WIDTH)
        columns = {"x": SyntheticRows(n, ROW_WIDTH), "y": SyntheticRows(n, None)}
        jaxmint.data.write_npy_shards(columns, scratch / "big", rows_per_shard=4096)
        small = {k: v[: n // 64] for k, v in columns.items()}
        jaxmint.data.write_npy_shards(small, scratch / "small", rows_per_shard=4096)
        big_steps = 20 if args.quick else 300
        big = limited_run(scratch / "big", big_steps, limit)
        fits = limited_run(scratch / "small", big_steps, limit)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows = [[k, f"{m[k]:.0f}", f"{m[k] / m['memory']:.3f}"] for k in variants]
    print(table("\n(a) digits, batch 64: fit steps/s", ["data", "steps/s", "/ memory"], rows))
    print(
        f"\ntarget (a): grain_npy / memory >= {TARGET_GRAIN_OVER_MEMORY}: "
        f"{ratios['grain_npy']:.3f} "
        f"({'met' if ratios['grain_npy'] >= TARGET_GRAIN_OVER_MEMORY else 'MISSED'})"
    )
    print(
        f"(b) {big_mib} MiB of shards under a {limit or 'no'} MiB limit: "
        f"{big['steps_per_sec']:.1f} steps/s (peak {big['peak_mib']} MiB), the same rows "
        f"at 1/64 the size: {fits['steps_per_sec']:.1f} steps/s; ratio "
        f"{big['steps_per_sec'] / fits['steps_per_sec']:.3f}"
    )
    result = {
        "steps_per_sec": m,
        "over_memory": ratios,
        "target_grain_over_memory": TARGET_GRAIN_OVER_MEMORY,
        "met": ratios["grain_npy"] >= TARGET_GRAIN_OVER_MEMORY,
        "larger_than_memory": {
            "dataset_mib": big_mib,
            "limit_mib": limit or None,
            "big": big,
            "fits": fits,
            "big_over_fits": big["steps_per_sec"] / fits["steps_per_sec"],
        },
        "rounds": rounds,
        "steps": steps,
        "quick": args.quick,
        "environment": environment(),
    }
    write_result(result, args.out, load_before)


if __name__ == "__main__":
    main()
