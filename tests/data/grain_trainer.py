"""A training run on `.npy` shards through Grain, driven by the data tests in a subprocess.

    python grain_trainer.py SHARDS WORKDIR STEPS CHECKPOINT_EVERY WORKERS [SLEEP_PER_STEP]

Prints ``step N`` at every step and writes ``final.npz`` with the final params.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import optax

import jaxmint
from jaxmint import losses


def main():
    shards, workdir = sys.argv[1], sys.argv[2]
    steps, every, workers = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    pause = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    _, test = jaxmint.data.digits()

    def report(step, record):
        print(f"step {step}", flush=True)
        time.sleep(pause)

    result = jaxmint.fit(
        jaxmint.models.mlp((128,), num_outputs=10, dropout=0.2),
        losses.softmax_cross_entropy(),
        optax.adam(3e-3),
        jaxmint.data.NpyShards(shards),
        steps=steps,
        batch_size=64,
        seed=3,
        workdir=workdir,
        eval_data=test,
        eval_every=every,
        checkpoint_every=every,
        data_workers=workers,
        log_every=1,
        hooks=[report],
        progress=False,
    )
    flat = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(result.params)[0]
    }
    np.savez(os.path.join(workdir, "final.npz"), **flat)
    print("done", flush=True)


if __name__ == "__main__":
    main()
