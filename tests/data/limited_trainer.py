"""Train on `.npy` shards under an address-space limit (test_grain_fit.py, benchmarks/data.py).

    python limited_trainer.py SHARDS STEPS LIMIT_MIB [WORKERS]

``resource.setrlimit(RLIMIT_AS)`` caps this process's virtual memory at LIMIT_MIB
before anything is imported (0: no limit), so a dataset larger than the limit
cannot be read into memory, nor mapped whole. Prints ``PEAK_MIB <n>`` (VmPeak) and
``STEPS_PER_SEC <x>`` at the end.
"""

import os
import resource
import sys

limit_mib = int(sys.argv[3])
if limit_mib:
    resource.setrlimit(resource.RLIMIT_AS, (limit_mib << 20, limit_mib << 20))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import optax  # noqa: E402

import jaxmint  # noqa: E402
from jaxmint import losses  # noqa: E402


def peak_mib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) // 1024
    return -1


def main():
    shards, steps = sys.argv[1], int(sys.argv[2])
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    source = jaxmint.data.NpyShards(shards, max_open=2)
    start = time.perf_counter()
    result = jaxmint.fit(
        jaxmint.models.mlp((64,), 10),
        losses.softmax_cross_entropy(),
        optax.adam(1e-3),
        source,
        steps=steps,
        batch_size=64,
        data_workers=workers,
        log_every=steps,
        progress=False,
    )
    elapsed = time.perf_counter() - start
    print(f"LOSS {result.history[-1]['loss']:.4f}")
    print(f"STEPS_PER_SEC {steps / elapsed:.2f}")
    print(f"PEAK_MIB {peak_mib()}", flush=True)


if __name__ == "__main__":
    main()
