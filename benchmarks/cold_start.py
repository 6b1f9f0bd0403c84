"""Cold start and steady-state latency of an exported artifact, side by side.

    python benchmarks/cold_start.py [--quick]

(a) a fresh process loads the artifact (precompiled executables) and predicts once;
(b) a fresh process rebuilds the model from the experiment code, restores the orbax
    checkpoint and runs ``jax.jit`` for its first prediction;
(c) like (a) without the precompiled executables.
Targets: a/b <= 0.5; steady-state latency of the loaded artifact vs ``jax.jit(model.apply)``
in one process at batch 1/8/64 <= 1.05. Writes benchmarks/results/cold_start.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CHILD_ARTIFACT = """
import sys, time
def peak_rss_kb():  # VmHWM: this process image only (ru_maxrss survives fork+exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import numpy as np
import jaxmint_runtime
p = jaxmint_runtime.load(sys.argv[1], precompiled=sys.argv[2] == "1")
out = p(np.zeros((1, 64), np.float32))
print(time.time(), peak_rss_kb())
"""

CHILD_TRAINING_CODE = """
import sys, time
def peak_rss_kb():  # VmHWM: this process image only (ru_maxrss survives fork+exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import numpy as np
import jax
from jaxmint.run import load_params
from jaxmint.export import load_experiment
module, config, _ = load_experiment(sys.argv[1])
model = module.build(config).model
weights, _ = load_params(sys.argv[1])
variables = {"params": weights["params"], **(weights["model_state"] or {})}
out = np.asarray(jax.jit(model.apply)(variables, np.zeros((1, 64), np.float32)))
print(time.time(), peak_rss_kb())
"""


def spawn(code: str, *args: str, env: dict) -> tuple[float, float]:
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    done, rss_kb = out.stdout.split()[-2:]
    return float(done) - t0, int(rss_kb) / 1024


def train_and_export(tmp: Path, quick: bool) -> tuple[Path, Path]:
    from jaxmint.experiment import fit_experiment, load_module
    from jaxmint.export import export_run

    script = REPO / "experiments/digits_mlp.py"
    module = load_module(script)
    config = dataclasses.replace(
        module.Config(),
        workdir=str(tmp / "run"),
        progress=False,
        steps=50 if quick else 300,
        eval_every=10**6,
        checkpoint_every=10**6,
    )
    fit_experiment(module.build(config), config, script=script)
    art = export_run(tmp / "run", tmp / "artifact", batch_sizes=(1, 8, 64))
    return tmp / "run", art


def steady_latency(run_dir: Path, art: Path, rounds: int, iters: int) -> dict:
    import jax

    import jaxmint_runtime
    from jaxmint.export import load_experiment
    from jaxmint.run import load_params

    module, config, _ = load_experiment(run_dir)
    model = module.build(config).model
    weights, _ = load_params(run_dir)
    variables = {"params": weights["params"], **(weights["model_state"] or {})}
    jitted = jax.jit(model.apply)
    predictor = jaxmint_runtime.load(art)
    result = {}
    for b in (1, 8, 64):
        x = np.random.default_rng(0).random((b, 64), dtype=np.float32)
        for _ in range(20):  # warm both
            predictor(x)
            np.asarray(jitted(variables, x))
        runs = {"artifact": [], "jit": []}
        for _ in range(rounds):  # interleaved rounds, median per variant
            t = time.perf_counter()
            for _ in range(iters):
                predictor(x)
            runs["artifact"].append((time.perf_counter() - t) / iters)
            t = time.perf_counter()
            for _ in range(iters):
                np.asarray(jitted(variables, x))
            runs["jit"].append((time.perf_counter() - t) / iters)
        a, j = statistics.median(runs["artifact"]), statistics.median(runs["jit"])
        result[b] = {"artifact_us": a * 1e6, "jit_us": j * 1e6, "ratio": a / j}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="jaxmint-bench-"))
    run_dir, art = train_and_export(tmp, args.quick)
    env = {**os.environ, "JAXMINT_CACHE_DIR": str(tmp / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # cold: not a JAX cache the shell turned on
    cold = {"a_artifact_precompiled": [], "b_training_code": [], "c_artifact_compiled": []}
    for _ in range(repeats):  # interleaved
        cold["a_artifact_precompiled"].append(spawn(CHILD_ARTIFACT, str(art), "1", env=env))
        cold["b_training_code"].append(spawn(CHILD_TRAINING_CODE, str(run_dir), env=env))
        env_c = {**env, "JAXMINT_CACHE_DIR": str(tmp / f"empty-{len(cold['c_artifact_compiled'])}")}
        cold["c_artifact_compiled"].append(spawn(CHILD_ARTIFACT, str(art), "0", env=env_c))
    summary = {
        k: {"seconds": statistics.median(t for t, _ in v), "peak_rss_mb": max(r for _, r in v)}
        for k, v in cold.items()
    }
    a = summary["a_artifact_precompiled"]["seconds"]
    b = summary["b_training_code"]["seconds"]
    latency = steady_latency(
        run_dir, art, rounds=3 if args.quick else 7, iters=50 if args.quick else 400
    )
    results = {
        "cold_start": summary,
        "ratio_a_over_b": a / b,
        "target_a_over_b": 0.5,
        "steady_state": latency,
        "target_latency_ratio": 1.05,
    }
    print(f"{'cold start':<28}{'seconds':>10}{'peak RSS MB':>14}")
    for k, v in summary.items():
        print(f"{k:<28}{v['seconds']:>10.2f}{v['peak_rss_mb']:>14.0f}")
    print(f"ratio a/b = {a / b:.2f} (target <= 0.5)")
    print(f"{'batch':<8}{'artifact us':>14}{'jax.jit us':>14}{'ratio':>8}  (target <= 1.05)")
    for b_, v in latency.items():
        print(f"{b_:<8}{v['artifact_us']:>14.1f}{v['jit_us']:>14.1f}{v['ratio']:>8.3f}")
    out = REPO / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cold_start.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
