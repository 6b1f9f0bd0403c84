"""One process of a multi-process training run (for test_parallel.py).

    python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR [DEVICES MESH]

Each process has DEVICES fake CPU devices (default 2); collectives go through gloo
on 127.0.0.1. The mesh (default ``data=2,fsdp=2``) puts ``data`` across the
processes and its other axes inside each. The run is parallel_check.py's ``mlp``
case, with a checkpoint every 3 steps: a WORKDIR that holds one continues it.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={sys.argv[5] if len(sys.argv) > 5 else 2}"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import json

import jax
import numpy as np
import optax

import jaxmint
from jaxmint import losses
from jaxmint.train import initialize_distributed
from jaxmint.train._parallel import make_mesh


def main():
    port, n, pid, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mesh = sys.argv[6] if len(sys.argv) > 6 else "data=2,fsdp=2"
    initialize_distributed(f"127.0.0.1:{port}", n, pid)
    axes = dict((name, int(size)) for name, size in (a.split("=") for a in mesh.split(",")))
    devices = make_mesh(axes).devices
    # data spans the processes; every other axis stays inside one.
    assert all({d.process_index for d in row.flat} == {i} for i, row in enumerate(devices))
    train, test = jaxmint.data.digits()
    result = jaxmint.fit(
        jaxmint.models.mlp((64, 64), 10),
        losses.softmax_cross_entropy(),
        optax.sgd(0.1, momentum=0.9),
        train,
        steps=6,
        batch_size=64,
        mesh=mesh,
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
            "params": [float(np.sum(np.abs(p))) for p in jax.tree.leaves(result.params)],
        }
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
