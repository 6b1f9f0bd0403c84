"""Cost of checkpointing in `jaxmint.fit`, and the time to resume a run.

Run (about 2-3 minutes on 2 idle CPU cores, longer on a busy machine; ``--quick`` is a
15-second smoke run on a small model that only checks the script works)::

    python benchmarks/checkpoint.py                      # full, the wide MLP
    python benchmarks/checkpoint.py --model mlp          # overhead.py's digits MLP
    python benchmarks/checkpoint.py --model transformer  # overhead.py's transformer
    python benchmarks/checkpoint.py --quick              # what the test suite runs

Targets:

* steps/s of a `fit` run that checkpoints every 50 steps / steps/s of the same run
  without periodic checkpoints (``checkpoint_every=None``, but still with a workdir, so
  that metrics.jsonl and TensorBoard logging are the same): **>= 0.95** (orbax saves
  asynchronously, so the writes should overlap the following steps). The model is an
  MLP 64-2560-2560-10 (6.75M float32 parameters, 27 MB; the saved state with Adam's
  two moments is about 81 MB) on the digits data, batch 32, ``optax.adam(1e-3)``.
  ``--model mlp`` and ``--model transformer`` take `benchmarks/overhead.py`'s models
  (the 64-512-512-10 digits MLP at batch 256, whose 50 steps take about 0.1-0.2 s,
  so orbax's fixed cost per save dominates: target **>= 0.8**; and the 2-layer
  transformer: target **>= 0.97**), without the resume measurement.
* time to resume: a fresh Python process that calls `fit` on an existing run
  directory with ``steps = saved step + 1``, from just before the parent spawns it to
  the first step done; reported with its breakdown (interpreter and imports, data
  and model, fit's setup and the restore, first step including its compile). A fresh
  run in a fresh process (an empty workdir) is timed the same way as the reference.

The two variants run side by side in this process, interleaved round by round (the
order alternates each round); a variant's rate is the median over its measured
50-step intervals. Two checks that depend less on other load on the machine come
with it: the process CPU time per step of both variants, and one save timed alone
(blocking time, time until written, CPU time).

Results are printed as a table and written to ``benchmarks/results/checkpoint.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from _common import environment, interval_rates, med, steady_rate, table, write_result
from jax.experimental.compilation_cache import compilation_cache

import jaxmint
from jaxmint.checkpoint import RunCheckpoints

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (2560, 2560)  # 6.75M float32 parameters: 27 MB
QUICK_WIDTHS = (256, 256)  # --quick only checks that the script works
BATCH_SIZE = 32
LOG_EVERY = 50
CHECKPOINT_EVERY = 50
LEARNING_RATE = 1e-3
TARGET_CKPT_OVER_PLAIN = {"wide": 0.95, "mlp": 0.8, "transformer": 0.97}

# The child process of the resume measurement. It prints ``STAMP <name> <time.time()>``
# lines; the parent reads them against its own clock (same machine, same clock).
CHILD = textwrap.dedent(
    """
    import time
    print("STAMP interpreter", time.time(), flush=True)
    import sys
    import optax
    import jaxmint
    print("STAMP imported", time.time(), flush=True)
    workdir, steps, widths, batch_size, log_every, every, lr = sys.argv[1:8]
    widths = tuple(int(w) for w in widths.split(","))
    train, _ = jaxmint.data.digits()
    model = jaxmint.models.mlp(widths, num_outputs=10)
    print("STAMP data_ready", time.time(), flush=True)

    class Stamps(jaxmint.Hook):
        first = True

        def on_fit_start(self, state, start_step):
            print("STAMP fit_start", time.time(), start_step, flush=True)

        def on_log(self, step, record):
            if self.first:
                print("STAMP first_step", time.time(), step, flush=True)
                self.first = False

    jaxmint.fit(
        model, jaxmint.losses.softmax_cross_entropy(), optax.adam(float(lr)), train,
        steps=int(steps), batch_size=int(batch_size), workdir=workdir,
        checkpoint_every=int(every), log_every=int(log_every), progress=False,
        hooks=[Stamps()],
    )
    print("STAMP fit_done", time.time(), flush=True)
    """
)


# -- helpers ---------------------------------------------------------------------------


def dir_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


class CpuStamps(jaxmint.Hook):
    """Process CPU time (all threads: XLA's pool, orbax's writer) at each log step."""

    def __init__(self):
        self.stamps = []

    def on_log(self, step, record):
        self.stamps.append((step, time.process_time()))

    def per_step(self) -> list[float]:
        """CPU seconds per step of each logged interval but the first (the compile).

        The first stamp is taken at the first log step, so the first interval is
        never among these pairs.
        """
        pairs = itertools.pairwise(self.stamps)
        return [(c1 - c0) / (s1 - s0) for (s0, c0), (s1, c1) in pairs]


def isolated_saves(state, directory: Path, count: int, bare: bool = False) -> dict:
    """Time ``count`` saves of ``state`` alone: the call, the write, the CPU they take.

    ``bare``: orbax's own async `CheckpointManager` with a `StandardSave` of the state
    and nothing else (no copy, metadata item, digest or keep policy), to tell orbax's
    share of a save from `RunCheckpoints`'.
    """
    if bare:
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True)
        manager = ocp.CheckpointManager(directory, options=options)
        tree, close, wait = state._asdict(), manager.close, manager.wait_until_finished

        def save(step):
            manager.save(step, args=ocp.args.StandardSave(tree))

    else:
        ckpt = RunCheckpoints(directory)
        close, wait = ckpt.close, ckpt.wait

        def save(step):
            ckpt.save(step, state)

    out = {"blocking": [], "written": [], "cpu": []}
    try:
        for step in range(1, count + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            save(step)
            t1 = time.perf_counter()
            wait()
            t2, c2 = time.perf_counter(), time.process_time()
            out["blocking"].append(t1 - t0)
            out["written"].append(t2 - t0)
            out["cpu"].append(c2 - c0)
    finally:
        close()
    return out


@contextlib.contextmanager
def timed_saves(into: list):
    """Time every periodic (non-final) `RunCheckpoints.save` call fit makes, into ``into``."""
    original = RunCheckpoints.save

    def save(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            if not kwargs.get("final", False):
                into.append(time.perf_counter() - t0)

    RunCheckpoints.save = save
    try:
        yield
    finally:
        RunCheckpoints.save = original


def spawn_fit(workdir: Path, steps: int, widths) -> dict:
    """Run `fit` in a fresh Python process; return its stamps relative to the spawn."""
    argv = [
        str(workdir),
        str(steps),
        ",".join(map(str, widths)),
        str(BATCH_SIZE),
        str(LOG_EVERY),
        str(CHECKPOINT_EVERY),
        str(LEARNING_RATE),
    ]
    t0 = time.time()  # "process start": just before spawning
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=False, env=env
    )
    t_exit = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"the child fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stamps, extra = {}, {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["STAMP"]:
            stamps[parts[1]] = float(parts[2]) - t0
            if len(parts) > 3:
                extra[parts[1]] = int(parts[3])
    stamps["exit"] = t_exit - t0
    return {
        "seconds_from_spawn": stamps,
        "start_step": extra.get("fit_start"),
        "first_step": extra.get("first_step"),
    }


# -- the benchmark ---------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--model", choices=("wide", "mlp", "transformer"), default="wide")
    parser.add_argument("--out", type=Path, default=None, help="default results/checkpoint*.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    suffix = "" if args.model == "wide" else f"_{args.model}"
    args.out = args.out or RESULTS / f"checkpoint{suffix}.json"
    target = TARGET_CKPT_OVER_PLAIN[args.model]

    # Steps per run (the first logged interval holds the compile; each later one holds
    # exactly one periodic save in the checkpointing run), rounds, resume repeats.
    n_steps, rounds, resumes = (100, 1, 1) if args.quick else (150, 6, 2)
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    if args.model == "wide":
        train, _ = jaxmint.data.digits()
        model = jaxmint.models.mlp(widths, num_outputs=10)
        batch_size, described = BATCH_SIZE, f"mlp{widths} -> 10 on digits (64 features)"
    else:  # overhead.py's models; no resume measurement (its child trains the wide MLP)
        from overhead import setup

        train, model, _, batch_size, described = setup(args.model, args.quick)
        resumes = 0
        if not args.quick:
            n_steps, rounds = (400, 6) if args.model == "mlp" else (200, 3)
    loss = jaxmint.losses.softmax_cross_entropy()
    optimizer = optax.adam(LEARNING_RATE)
    scratch = Path(tempfile.mkdtemp(prefix="jaxmint-bench-ckpt-"))
    # fit jits a fresh step on every call. JAX's persistent compilation cache (in this
    # process only, in the scratch dir) serves every compile after the first from
    # disk, which cuts each run's fixed cost from seconds to a fraction of one and
    # leaves room for more, shorter interleaved rounds. The measured intervals exclude
    # the compile either way. The resume children do not use it: they compile as a
    # fresh process would.
    cache_settings = {
        "jax_compilation_cache_dir": str(scratch / "jax-cache"),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": -1,
    }
    saved_settings = {name: getattr(jax.config, name) for name in cache_settings}
    for name, value in cache_settings.items():
        jax.config.update(name, value)

    def run(checkpoint_every, steps, workdir=None, hooks=()):
        workdir = workdir or Path(tempfile.mkdtemp(dir=scratch))
        t0 = time.perf_counter()
        result = jaxmint.fit(
            model,
            loss,
            optimizer,
            train,
            steps=steps,
            batch_size=batch_size,
            progress=False,
            log_every=LOG_EVERY,
            workdir=workdir,
            checkpoint_every=checkpoint_every,
            hooks=hooks,
        )
        return time.perf_counter() - t0, result, workdir

    try:
        _, warm, _ = run(None, 2)  # imports orbax, first compiles
        param_bytes = sum(np.asarray(p).nbytes for p in jax.tree_util.tree_leaves(warm.params))
        state_bytes = sum(
            np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(jax.device_get(warm.state))
        )
        isolated = isolated_saves(warm.state, scratch / "isolated", 2 if args.quick else 4)
        bare = isolated_saves(warm.state, scratch / "bare", 2 if args.quick else 4, bare=True)

        # Throughput method: fit's own per-log ``steps_per_sec`` records, summed over
        # every logged interval except the first (which holds the compile). fit saves
        # right after a log step, so in the checkpointing run each measured interval of
        # 50 steps starts with one save (the device copy of the state, orbax's blocking
        # part, then the background write overlapping the next steps): the interval's
        # rate is the steady-state rate with a save every 50 steps. The final save that
        # fit makes in both variants comes after the last log, outside every interval;
        # it is part of the wall time, which is reported too. The headline rate of a
        # variant is the median over all its measured intervals (a burst of load from
        # another process spoils a few intervals, not a whole variant); the rate of
        # each whole run and the median of the per-round paired ratios are kept as
        # checks. The time fit's loop spends inside each periodic save call (the
        # synchronous part of an async save) is timed by wrapping the method.
        raw = {"ckpt": [], "plain": []}
        intervals = {"ckpt": [], "plain": []}
        wall = {"ckpt": [], "plain": []}
        save_blocking = []
        cpu_per_step = {"ckpt": [], "plain": []}
        last_ckpt_dir = None
        for r in range(rounds):
            order = ("ckpt", "plain") if r % 2 == 0 else ("plain", "ckpt")
            for name in order:
                every = CHECKPOINT_EVERY if name == "ckpt" else None
                cpu = CpuStamps()
                with timed_saves(save_blocking):
                    seconds, result, workdir = run(every, n_steps, hooks=[cpu])
                raw[name].append(steady_rate(result.history))
                intervals[name] += interval_rates(result.history)
                cpu_per_step[name] += cpu.per_step()
                wall[name].append(seconds)
                if name == "ckpt":
                    if last_ckpt_dir is not None:
                        shutil.rmtree(last_ckpt_dir, ignore_errors=True)
                    last_ckpt_dir = workdir
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
            print(
                f"round {r + 1}/{rounds}: checkpointing {raw['ckpt'][-1]:.2f} steps/s, "
                f"plain {raw['plain'][-1]:.2f} steps/s",
                flush=True,
            )
        m = {k: med(v) for k, v in intervals.items()}
        runs = {k: med(v) for k, v in raw.items()}
        ratio = m["ckpt"] / m["plain"]
        cpu_ratio = med(cpu_per_step["plain"]) / med(cpu_per_step["ckpt"])
        paired = med([a / b for a, b in zip(raw["ckpt"], raw["plain"], strict=True)])
        saved_steps = sorted(
            int(p.name) for p in (last_ckpt_dir / "checkpoints").iterdir() if p.name.isdigit()
        )
        checkpoint_mb = dir_megabytes(last_ckpt_dir / "checkpoints" / str(saved_steps[-1]))

        # Resume: a fresh process on a copy of the last checkpointing run's workdir
        # (a copy each time, so every attempt resumes from the same step), and, as the
        # reference, a fresh run in a fresh process on an empty workdir.
        resume_runs, fresh_runs = [], []
        for i in range(resumes):  # none for overhead.py's models
            copy = scratch / f"resume{i}"
            shutil.copytree(last_ckpt_dir, copy)
            resume_runs.append(spawn_fit(copy, saved_steps[-1] + 1, widths))
            if resume_runs[-1]["start_step"] != saved_steps[-1]:
                raise RuntimeError(f"the child did not resume from step {saved_steps[-1]}")
            fresh_runs.append(spawn_fit(scratch / f"fresh{i}", 1, widths))
            shutil.rmtree(copy, ignore_errors=True)
    finally:
        for name, value in saved_settings.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
        shutil.rmtree(scratch, ignore_errors=True)

    def phases(runs):
        keys = ("interpreter", "imported", "data_ready", "fit_start", "first_step", "exit")
        return {k: med([run["seconds_from_spawn"][k] for run in runs]) for k in keys}

    resume, fresh = (phases(resume_runs), phases(fresh_runs)) if resumes else (None, None)
    result = {
        "benchmark": "checkpoint",
        "command": f"python benchmarks/checkpoint.py --model {args.model}"
        + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {**environment(), "load_average_at_start": load_before},
        "config": {
            "model": described,
            "param_megabytes": param_bytes / 1e6,
            "train_state_megabytes": state_bytes / 1e6,
            "checkpoint_megabytes_on_disk": checkpoint_mb,
            "batch_size": batch_size,
            "optimizer": f"adam({LEARNING_RATE})",
            "log_every": LOG_EVERY,
            "checkpoint_every": CHECKPOINT_EVERY,
            "steps_per_run": n_steps,
            "rounds": rounds,
        },
        "throughput": {
            "ckpt_steps_per_sec": m["ckpt"],
            "plain_steps_per_sec": m["plain"],
            "ratio": ratio,
            "target": target,
            "meets_target": ratio >= target,
            "measured_intervals_per_variant": len(intervals["ckpt"]),
            "per_run_ckpt_steps_per_sec": runs["ckpt"],
            "per_run_plain_steps_per_sec": runs["plain"],
            "per_run_ratio": runs["ckpt"] / runs["plain"],
            "per_run_ratio_paired_median": paired,
            "cpu_ms_per_step_ckpt": med(cpu_per_step["ckpt"]) * 1e3,
            "cpu_ms_per_step_plain": med(cpu_per_step["plain"]) * 1e3,
            "cpu_ratio_plain_over_ckpt": cpu_ratio,
            "periodic_saves_timed": len(save_blocking),
            "save_call_blocking_seconds_median": med(save_blocking) if save_blocking else None,
            "interval_seconds_plain": CHECKPOINT_EVERY / m["plain"],
            "ckpt_wall_seconds_per_run": med(wall["ckpt"]),
            "plain_wall_seconds_per_run": med(wall["plain"]),
        },
        "isolated_save": {
            "what": "RunCheckpoints.save of the trained state with nothing else running in "
            "this process: the call's blocking time, the time until the background write "
            "is done, and the process CPU time (all threads) it took; median over saves",
            "blocking_seconds": med(isolated["blocking"]),
            "written_after_seconds": med(isolated["written"]),
            "cpu_seconds": med(isolated["cpu"]),
            "cpu_fraction_of_plain_interval": med(isolated["cpu"])
            / (med(cpu_per_step["plain"]) * CHECKPOINT_EVERY),
            "raw": isolated,
            "orbax_only_cpu_seconds": med(bare["cpu"]),
            "orbax_only_blocking_seconds": med(bare["blocking"]),
            "orbax_only_raw": bare,
        },
        "resume": None
        if resume is None
        else {
            "resumed_from_step": saved_steps[-1],
            "seconds_to_first_step": resume["first_step"],
            "phases_seconds_from_spawn": resume,
            "fresh_run_seconds_to_first_step": fresh["first_step"],
            "fresh_phases_seconds_from_spawn": fresh,
        },
        "raw": {
            "run_steps_per_sec": raw,
            "interval_steps_per_sec": intervals,
            "wall_seconds": wall,
            "save_call_blocking_seconds": save_blocking,
            "interval_cpu_seconds_per_step": cpu_per_step,
            "resume": resume_runs,
        },
        "raw_fresh": fresh_runs,
    }

    print()
    print(
        table(
            f"steps/s, medians over {rounds} interleaved rounds of {n_steps} steps; target "
            f"ratio >= {target} -> {'MET' if ratio >= target else 'MISSED'}",
            ["variant", "50-step intervals", "whole runs", "wall s/run"],
            [
                [
                    f"checkpoint every {CHECKPOINT_EVERY}",
                    f"{m['ckpt']:.2f}",
                    f"{runs['ckpt']:.2f}",
                    f"{med(wall['ckpt']):.1f}",
                ],
                [
                    "no periodic checkpoint",
                    f"{m['plain']:.2f}",
                    f"{runs['plain']:.2f}",
                    f"{med(wall['plain']):.1f}",
                ],
                ["ratio", f"{ratio:.3f}", f"{runs['ckpt'] / runs['plain']:.3f}", ""],
            ],
        )
    )
    print(
        f"CPU time per step (all threads; less sensitive to other load than wall time): "
        f"checkpointing {med(cpu_per_step['ckpt']) * 1e3:.1f} ms, "
        f"plain {med(cpu_per_step['plain']) * 1e3:.1f} ms -> ratio plain/checkpointing "
        f"{cpu_ratio:.3f}"
    )
    blocking = f"{med(save_blocking) * 1e3:.0f} ms" if save_blocking else "n/a"
    print(
        f"params {param_bytes / 1e6:.1f} MB, train state {state_bytes / 1e6:.1f} MB, "
        f"checkpoint on disk {checkpoint_mb:.1f} MB; fit blocks {blocking} in each periodic "
        f"save call (median of {len(save_blocking)}), per {CHECKPOINT_EVERY} steps of "
        f"{CHECKPOINT_EVERY / m['plain']:.2f} s"
    )
    print(
        f"one save alone (median of {len(isolated['cpu'])}): the call blocks "
        f"{med(isolated['blocking']) * 1e3:.0f} ms, written after "
        f"{med(isolated['written']) * 1e3:.0f} ms, {med(isolated['cpu']) * 1e3:.0f} ms of CPU = "
        f"{result['isolated_save']['cpu_fraction_of_plain_interval']:.1%} of the CPU time of "
        f"{CHECKPOINT_EVERY} plain steps; orbax's own manager alone: "
        f"{med(bare['cpu']) * 1e3:.0f} ms of CPU, blocks {med(bare['blocking']) * 1e3:.0f} ms"
    )
    print()

    def row(name, p):
        return [
            name,
            f"{p['imported']:.2f}",
            f"{p['data_ready'] - p['imported']:.2f}",
            f"{p['fit_start'] - p['data_ready']:.2f}",
            f"{p['first_step'] - p['fit_start']:.2f}",
            f"{p['first_step']:.2f}",
        ]

    if resume is not None:
        print(
            table(
                f"seconds from spawn, median of {resumes} (resume from step {saved_steps[-1]})",
                [
                    "process",
                    "interp+imports",
                    "data+model",
                    "fit setup+restore",
                    "first step",
                    "to first step",
                ],
                [row("resume", resume), row("fresh run (ref.)", fresh)],
            )
        )

    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
