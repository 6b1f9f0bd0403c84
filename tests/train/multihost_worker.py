"""One process of a multi-process training run (for test_parallel.py).

    python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR

Each process has 2 fake CPU devices; collectives go through gloo on 127.0.0.1. The
mesh is data=2 (one per process) by fsdp=2 (the two devices of a process).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import json

import numpy as np
import optax

import jaxmint
from jaxmint import losses
from jaxmint.train import initialize_distributed
from jaxmint.train._parallel import make_mesh


def main():
    port, n, pid, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    initialize_distributed(f"127.0.0.1:{port}", n, pid)
    mesh = make_mesh({"data": 2, "fsdp": 2})
    # data spans the hosts; each host's two devices are its fsdp axis.
    assert [[d.process_index for d in row] for row in mesh.devices] == [[0, 0], [1, 1]]
    train, test = jaxmint.data.digits()
    result = jaxmint.fit(
        jaxmint.models.mlp((64, 64), 10),
        losses.softmax_cross_entropy(),
        optax.sgd(0.1, momentum=0.9),
        train,
        steps=6,
        batch_size=64,
        mesh="data=2,fsdp=2",  # data across the two processes, fsdp inside each
        log_every=1,
        progress=False,
        workdir=workdir,
        checkpoint_every=3,
        eval_data=test,
        eval_every=6,
        metrics={"accuracy": jaxmint.metrics.accuracy()},
    )
    if pid == 0:
        out = {
            "loss": [r["loss"] for r in result.history],
            "eval": result.final_eval,
            "params": [float(np.sum(np.abs(p))) for p in jaxmint_leaves(result.params)],
        }
        print("RESULT " + json.dumps(out), flush=True)


def jaxmint_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


if __name__ == "__main__":
    main()
