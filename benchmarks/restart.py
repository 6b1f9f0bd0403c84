"""Restarting a run: a fresh process with and without ``--compile-cache``, side by side.

    python benchmarks/restart.py [--quick] [--out FILE]

Each shipped experiment runs its ``--smoke`` config from scratch (a new ``--workdir``
each time) in a fresh process, the way a rerun, a resumed run after preemption or a
replayed step starts: (a) without a compilation cache, every program compiled;
(b) with ``--compile-cache`` in a folder a first run filled, every program loaded.
Rounds interleave (a) and (b). Reported: seconds from spawn to exit, medians, and
b/a. Target: b/a <= 0.8 on the digits MLP (``--quick``: one round, the MLP only, and the
run that fills the cache stands for (a): a smoke run for the tests).
Writes benchmarks/results/restart.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, med, table, write_result

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.8


def run_once(script: str, workdir: Path, cache: Path | None, env: dict) -> float:
    argv = [sys.executable, str(REPO / "experiments" / script), "--smoke", "--no-progress"]
    argv += ["--workdir", str(workdir)]
    if cache is not None:
        argv += ["--compile-cache", str(cache)]
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, the MLP only")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/restart.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    # A fresh process as a user starts it: no JAX cache settings from this shell.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
    }
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    scripts = ["digits_mlp.py"] if args.quick else ["digits_mlp.py", "char_transformer.py"]
    rounds = 1 if args.quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="jaxmint-bench-restart-"))
    result = {"config": {"quick": args.quick, "rounds": rounds}, "environment": environment()}
    rows = []
    for script in scripts:
        name = script.removesuffix(".py")
        cache = tmp / f"xla-{name}"
        times = {"a_compiled": [], "b_cache": []}
        # A first run fills the cache (--quick: round 0's run (a), timed with its writes).
        fill = run_once(script, tmp / f"{name}-fill", cache, env)
        for i in range(rounds):
            if args.quick:
                times["a_compiled"].append(fill)
            else:
                times["a_compiled"].append(run_once(script, tmp / f"{name}-a{i}", None, env))
            times["b_cache"].append(run_once(script, tmp / f"{name}-b{i}", cache, env))
        a, b = med(times["a_compiled"]), med(times["b_cache"])
        result[name] = {"seconds": times, "a_median": a, "b_median": b, "ratio_b_over_a": b / a}
        rows.append((name, f"{a:.2f}", f"{b:.2f}", f"{a - b:.2f}", f"{b / a:.3f}"))
    print(
        table(
            f"a fresh process runs --smoke from scratch (median of {rounds}; seconds)",
            ("experiment", "a: compiles", "b: --compile-cache", "saved", "b/a"),
            rows,
        )
    )
    ratio = result["digits_mlp"]["ratio_b_over_a"]
    verdict = "met" if ratio <= TARGET else "missed"
    print(f"\ndigits_mlp b/a = {ratio:.3f} (target <= {TARGET}): {verdict}")
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
