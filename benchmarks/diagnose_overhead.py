"""Steps/s with diagnosis at its default interval (every 100 steps) vs without.

    python benchmarks/diagnose_overhead.py [--quick]

Target: ratio >= 0.95. Each variant's rate is its steps/s over the logged 50-step
intervals after the compiles, median over rounds interleaved in one process.
Writes benchmarks/results/diagnose_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import optax
from _common import environment, table

import jaxmint

DEFAULT_INTERVAL = 100


def rate(history) -> float:
    """Steps/s over every logged interval but the first three: the train step compiles
    in the first; the diagnostic step first runs (and compiles) right after the record
    of step 100, so inside the third."""
    rest = history[3:]
    return len(rest) * 50 / sum(50 / r["steps_per_sec"] for r in rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    args = parser.parse_args()
    train, _ = jaxmint.data.digits()
    model = jaxmint.models.mlp((256, 256), 10)
    loss = jaxmint.losses.softmax_cross_entropy() + 1e-4 * jaxmint.losses.l2()
    steps, rounds = (200, 1) if args.quick else (1000, 5)
    rates: dict[str, list[float]] = {"diagnosis": [], "plain": []}
    for _ in range(rounds):
        for name, every in (("diagnosis", DEFAULT_INTERVAL), ("plain", None)):
            h = jaxmint.fit(
                model,
                loss,
                optax.adam(1e-3),
                train,
                steps=steps,
                batch_size=128,
                progress=False,
                log_every=50,
                diagnose_every=every,
            ).history
            rates[name].append(rate(h))
    d, p = statistics.median(rates["diagnosis"]), statistics.median(rates["plain"])
    results = {
        "environment": environment(),
        "steps_per_sec": {"diagnosis": d, "plain": p},
        "ratio": d / p,
        "target": 0.95,
        "interval": DEFAULT_INTERVAL,
        "raw": rates,
    }
    print(
        table(
            "steps/s after compiles, median of rounds",
            ["variant", "steps/s"],
            [
                ["diagnosis every 100", f"{d:.1f}"],
                ["none", f"{p:.1f}"],
                ["ratio (target >= 0.95)", f"{d / p:.3f}"],
            ],
        )
    )
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "diagnose_overhead.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
