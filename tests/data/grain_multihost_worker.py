"""One process of a two-process run reading `.npy` shards through Grain (test_grain_fit.py).

    python grain_multihost_worker.py PORT PROCESS_ID SHARDS WORKDIR STOP_AFTER

Each process has 2 fake CPU devices (mesh data=2 across the processes, fsdp=2
inside each). Prints ``IDS <step> <ids>`` with the example ids this process read.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np
import optax

import jaxmint
from jaxmint import losses
from jaxmint.train import Hook, initialize_distributed


class PrintIds(Hook):
    def on_step(self, loop, step, state, batch, out):
        ids = np.concatenate([np.asarray(s.data) for s in batch["id"].addressable_shards])
        print(f"IDS {step} {' '.join(map(str, ids.tolist()))}", flush=True)


def main():
    port, pid, shards, workdir, stop_after = sys.argv[1:6]
    initialize_distributed(f"127.0.0.1:{port}", 2, int(pid))
    jaxmint.fit(
        jaxmint.models.mlp((32,), 10),
        losses.softmax_cross_entropy(),
        optax.sgd(0.1),
        jaxmint.data.NpyShards(shards),
        steps=22,
        stop_after=int(stop_after),
        batch_size=64,
        seed=5,
        mesh="data=2,fsdp=2",
        workdir=workdir,
        checkpoint_every=11,
        hooks=[PrintIds()],
        progress=False,
    )


if __name__ == "__main__":
    main()
