"""Overhead of a sweep: 16 trials through `jaxmint sweep` against the same 16 fits in one loop.

Run (about 2 minutes on 2 CPU cores; ``--quick`` is a 2-trial smoke run, without the
one-worker sweep)::

    python benchmarks/sweep_overhead.py            # full
    python benchmarks/sweep_overhead.py --quick    # what the test suite runs

The experiment is tiny (the digits MLP at its ``--smoke`` size, 40 steps), so the
sweep's fixed costs dominate. Measured side by side in this run:

* (a) ``jaxmint sweep --workers 2`` (submitit local executor, journal file, heartbeats,
  a checkpointed run dir per trial): wall time.
* (b) the same trials (the parameters the sweep drew) as back-to-back `fit` calls in one
  process, each with its own run dir and checkpoints: wall time, per trial.
* (c) ``jaxmint sweep --workers 1``: wall time (no CPU contention between workers).
* process start: a fresh interpreter importing the worker (jax included).

Overhead per trial, beyond process start and compile (each trial compiles in both
(a) and (b), since the learning rate is a constant of its compiled step)::

    (c) one worker:  ((c) - start) / n - (b) / n
    (a) two workers: ((a) - start) * 2 / n - (b) / n   (includes 2 workers sharing the cores)

Target: the one-worker overhead is under 1.5 s per trial. Results are printed and
written to ``benchmarks/results/sweep_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
EXPERIMENT = REPO / "experiments" / "digits_mlp.py"
OVERRIDES = ["--smoke", "--hidden", "64"]
TARGET_S = 1.5

SCRIPT = f"""
import dataclasses
import sys
sys.path.insert(0, {str(REPO / "experiments")!r})
from jaxmint.experiment import load_module
from jaxmint.sweep import LogUniform, Spec, Uniform

_digits = load_module({str(EXPERIMENT)!r})
Config, build, SMOKE = _digits.Config, _digits.build, _digits.SMOKE


def sweep():
    return Spec({{"lr": LogUniform(1e-4, 3e-2), "label_smoothing": Uniform(0.0, 0.2)}},
                objective="eval/accuracy", direction="maximize", trials=16,
                sampler="random", pruner="none")
"""


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_sweep(script: Path, sweep_dir: Path, trials: int, workers: int) -> float:
    cmd = [
        sys.executable,
        "-c",
        "import sys; from jaxmint.cli import main; sys.exit(main())",
        "sweep",
        str(script),
        "--sweep-dir",
        str(sweep_dir),
        "--trials",
        str(trials),
        "--workers",
        str(workers),
        "--timeout-min",
        "20",
        "--devices",
        "",
        "--",
        *OVERRIDES,
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1500)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"sweep failed:\n{out.stderr[-3000:]}")
    return wall


def process_start() -> float:
    """A fresh interpreter importing the worker module (jax, optuna and jaxmint)."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import jaxmint.sweep._worker, optuna"],
        check=True,
        env=_env(),
        timeout=300,
    )
    return time.perf_counter() - t0


def sequential(script: Path, params: list[dict], root: Path) -> float:
    """The same trainings as back-to-back fits in this process (run dirs included)."""
    from jaxmint.experiment import fit_experiment
    from jaxmint.sweep._space import apply
    from jaxmint.sweep._worker import base_config, load_sweep

    module, _ = load_sweep(script)
    base = base_config(module, OVERRIDES)
    t0 = time.perf_counter()
    for i, p in enumerate(params):
        config = apply(base, p, workdir=str(root / str(i)), progress=False)
        fit_experiment(module.build(config), config)
    return time.perf_counter() - t0


def drawn_params(sweep_dir: Path) -> list[dict]:
    from jaxmint.sweep import open_study
    from jaxmint.sweep._worker import load_sweep

    state = json.loads((sweep_dir / "sweep.json").read_text())
    study = open_study(sweep_dir, load_sweep(state["experiment"])[1])
    return [t.params for t in sorted(study.get_trials(), key=lambda t: t.number)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 trials: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep_overhead.json")
    args = parser.parse_args(argv)
    n = 2 if args.quick else 16
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        tmp = Path(tmp)
        script = tmp / "tiny_digits.py"
        script.write_text(SCRIPT)
        start = min(process_start() for _ in range(1 if args.quick else 2))
        two = run_sweep(script, tmp / "two", n, 2)
        params = drawn_params(tmp / "two")
        seq = sequential(script, params, tmp / "seq")
        # (--quick: the one-worker sweep is the same path with another count; skipped)
        one = None if args.quick else run_sweep(script, tmp / "one", n, 1)
    per_seq = seq / n
    over_one = None if one is None else (one - start) / n - per_seq
    over_two = (two - start) * 2 / n - per_seq
    result = {
        "trials": n,
        "experiment": f"{EXPERIMENT.name} {' '.join(OVERRIDES)}",
        "cpu_count": os.cpu_count(),
        "process_start_s": round(start, 3),
        "sequential_s": round(seq, 3),
        "sequential_per_trial_s": round(per_seq, 3),
        "sweep_1_worker_s": None if one is None else round(one, 3),
        "sweep_2_workers_s": round(two, 3),
        "overhead_per_trial_1_worker_s": None if over_one is None else round(over_one, 3),
        "overhead_per_trial_2_workers_s": round(over_two, 3),
        "speedup_2_workers_vs_sequential": round(seq / two, 3),
        "target_overhead_per_trial_s": TARGET_S,
        "meets_target": None if over_one is None else over_one < TARGET_S,
        "quick": args.quick,
    }
    for k, v in result.items():
        print(f"{k:<34} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
