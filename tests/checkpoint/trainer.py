"""A deterministic training run driven by the checkpoint tests in a subprocess.

    python trainer.py WORKDIR STEPS CHECKPOINT_EVERY [SLEEP_PER_STEP] [plain]

Prints ``step N`` at every step and writes ``final.npz`` with the final params.
With ``plain``, the model is `plain_mlp`: a dict of arrays in pure jax.numpy.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmint
from jaxmint import losses


def plain_mlp(hidden: int = 64, classes: int = 10) -> jaxmint.Model:
    """A two-layer MLP whose variables are a plain dict of arrays (no ``params`` key)."""

    def init(key, x_BxF):
        k1, k2 = jax.random.split(key)
        fan_in = x_BxF.shape[-1]
        return {
            "w1": jax.random.normal(k1, (fan_in, hidden)) / np.sqrt(fan_in),
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
            "b2": jnp.zeros(classes),
        }

    def apply(p, x_BxF, *, train=False, key=None):
        h_BxH = jax.nn.relu(x_BxF @ p["w1"] + p["b1"])
        return h_BxH @ p["w2"] + p["b2"]

    return jaxmint.Model(init, apply)


def main():
    workdir, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    plain = len(sys.argv) > 5 and sys.argv[5] == "plain"
    train, test = jaxmint.data.digits()

    def report(step, record):
        print(f"step {step}", flush=True)
        time.sleep(pause)

    result = jaxmint.fit(
        plain_mlp() if plain else jaxmint.models.mlp((256, 256), num_outputs=10, dropout=0.2),
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
