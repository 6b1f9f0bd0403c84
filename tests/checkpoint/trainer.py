"""A deterministic training run driven by the checkpoint tests in a subprocess.

    python trainer.py WORKDIR STEPS CHECKPOINT_EVERY [SLEEP_PER_STEP]

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
    workdir, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    train, test = jaxmint.data.digits()

    def report(step, record):
        print(f"step {step}", flush=True)
        time.sleep(pause)

    result = jaxmint.fit(
        jaxmint.models.mlp((256, 256), num_outputs=10, dropout=0.2),
        losses.softmax_cross_entropy() + 1e-4 * losses.l2(),
        optax.adamw(optax.cosine_decay_schedule(3e-3, steps), 1e-4),
        train,
        steps=steps,
        batch_size=64,
        seed=3,
        workdir=workdir,
        eval_data=test,
        eval_every=every,
        checkpoint_every=every,
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
