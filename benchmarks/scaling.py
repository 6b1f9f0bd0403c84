"""Steps/s of each strategy relative to a single device, same global batch.

    python benchmarks/scaling.py [--quick] [--devices 8]

On a CPU the devices are fake (``--xla_force_host_platform_device_count``) and
share the machine's cores, so the ratios are reported, not targets; on a GPU
node, run it as is to see real scaling. Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU only)")
    args = parser.parse_args()
    if "jax" in sys.modules:
        raise RuntimeError("run this script directly: it must set XLA_FLAGS before jax loads")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax
    import optax

    import jaxmint

    train, _ = jaxmint.data.digits()
    model = jaxmint.models.mlp((512, 512), 10)
    loss = jaxmint.losses.softmax_cross_entropy()
    steps = 40 if args.quick else 300
    rounds = 1 if args.quick else 3
    timings: dict[str, list[float]] = {s: [] for s in ("single", "data", "fsdp", "pmap")}
    for _ in range(rounds):  # interleaved rounds; fit(2N) - fit(N) cancels compile time
        for strategy in timings:
            spent = []
            for n in (steps, 2 * steps):
                t = time.perf_counter()
                jaxmint.fit(
                    model,
                    loss,
                    optax.adam(1e-3),
                    train,
                    steps=n,
                    batch_size=256,
                    strategy=strategy,
                    progress=False,
                    log_every=50,
                )
                spent.append(time.perf_counter() - t)
            timings[strategy].append(steps / max(spent[1] - spent[0], 1e-9))
    rates = {s: statistics.median(v) for s, v in timings.items()}
    results = {
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "steps_per_sec": rates,
        "relative_to_single": {s: r / rates["single"] for s, r in rates.items()},
    }
    print(f"{jax.device_count()} {results['platform']} devices, global batch 256, MLP 512x512")
    for s, r in rates.items():
        print(f"  {s:<8}{r:>10.1f} steps/s  x{r / rates['single']:.2f}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
