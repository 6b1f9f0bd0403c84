"""Run one training configuration and print its loss curve as JSON (for test_parallel.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python parallel_check.py CASE STRATEGY[,STRATEGY...] [WORKDIR|-] [STEPS]
        python parallel_check.py activations MESH[;MESH...]

Run in a subprocess so that the number of fake CPU devices can be chosen per run.
"""

import json
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

import jaxmint
from jaxmint import losses
from jaxmint.train import DEFAULT_RULES


class Annotated(nn.Module):
    @nn.compact
    def __call__(self, x):
        up = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        down = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "vocab"))
        h = nn.relu(nn.Dense(64, kernel_init=up, name="up")(x))
        return nn.Dense(16, kernel_init=down, name="down")(h)[:, :10]


class AnnotatedNnx(nnx.Module):
    """`Annotated` written with nnx: flax's nnx.with_partitioning names the same axes."""

    def __init__(self, rngs):
        up = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        down = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("mlp", "vocab"))
        self.up = nnx.Linear(64, 64, kernel_init=up, rngs=rngs)
        self.down = nnx.Linear(64, 16, kernel_init=down, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))[:, :10]


def _plain_init(key, x):
    k1, k2 = jax.random.split(key)
    scale = 1 / np.sqrt(x.shape[-1])
    return {
        "w_in": scale * jax.random.normal(k1, (x.shape[-1], 64)),
        "w_out": 0.125 * jax.random.normal(k2, (64, 16)),
    }


def _plain_apply(params, x, *, train=False, key=None):
    return (jax.nn.relu(x @ params["w_in"]) @ params["w_out"])[:, :10]


def setup(case: str, strategy: str):
    train, _ = jaxmint.data.digits()
    if case == "cnn":
        train = {"x": train["x"].reshape(-1, 8, 8, 1), "y": train["y"]}
        axis = "data" if strategy == "pmap" else None
        return jaxmint.models.cnn((8,), 10, axis_name=axis), train, {}
    if case == "transformer":  # heads, MLP width, vocabulary: 8 | each
        train, _ = jaxmint.data.stdlib_chars(16, max_bytes=40_000)
        return jaxmint.models.transformer(256, max_len=16, d_model=32, num_heads=8), train, {}
    if case == "transformer-scan":  # with the long-sequence pieces, two chunks of 8 each
        train, _ = jaxmint.data.stdlib_chars(16, max_bytes=40_000)
        model = jaxmint.models.transformer(
            256,
            max_len=16,
            d_model=32,
            num_heads=8,
            scan_layers=True,
            attention=jaxmint.models.chunked_attention(8),
        )
        return model, train, {"loss": losses.chunked_cross_entropy(chunk=8)}
    if case == "annotated-nnx":
        return jaxmint.models.from_nnx(AnnotatedNnx), train, {}
    if case.startswith("annotated"):  # a user's module with flax's logical partitioning
        rules = {**DEFAULT_RULES, "mlp": None} if case == "annotated-mlp-whole" else None
        return jaxmint.models.from_linen(Annotated()), train, {"rules": rules}
    if case == "pathnamed":  # a plain pytree model, named by path patterns
        return (
            jaxmint.models.axes_by_path(
                jaxmint.Model(_plain_init, _plain_apply),
                [(r"\['w_in'\]", ("embed", "mlp")), (r"\['w_out'\]", ("mlp", "vocab"))],
            ),
            train,
            {},
        )
    model = jaxmint.models.mlp((64, 64), 10)
    extra = {"grad_accum": 2} if case == "accum" else {}
    return model, train, extra


def activation_layouts(meshes) -> dict:
    """Per mesh: ``{shape: [mesh axes per dimension]}`` of every activation the built-in
    transformer constrains, read from its lowered program (and "outside": lowered with
    no layout, where constraining is a no-op)."""
    from jaxmint.models import activation_layout
    from jaxmint.train import _parallel as parallel

    model, _, _ = setup("transformer", "single")
    tokens = np.zeros((8, 16), np.int32)
    variables = model.init(jax.random.PRNGKey(0), tokens)

    def lowered():  # a fresh jit each time: a trace is cached with what it saw
        return jax.jit(lambda v, x: model.apply(v, x)).lower(variables, tokens).as_text()

    found = {"outside": _constraints(lowered())}
    for spec in meshes:
        with activation_layout(parallel.layout("mesh", spec), DEFAULT_RULES):
            found[spec] = _constraints(lowered())
    return found


def _constraints(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if "sharding_constraint" in line or "@Sharding" in line:
            shape = re.search(r"tensor<([0-9x]+)x[a-z]", line.split(":")[-1]).group(1)
            dims = re.search(r"\[(\{.*\})\]>", line).group(1)
            out[shape] = [re.findall(r'"(\w+)"', d) for d in re.findall(r"\{[^}]*\}", dims)]
    return out


def main():
    if sys.argv[1] == "activations":
        print("RESULT " + json.dumps(activation_layouts(sys.argv[2].split(";"))))
        return
    case, strategies = sys.argv[1], sys.argv[2].split(",")
    workdir = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    results = {s: run(case, s, workdir, steps) for s in strategies}
    print("RESULT " + json.dumps(results))


def run(case, strategy, workdir, steps):
    model, train, extra = setup(case, strategy)
    loss = extra.pop("loss", losses.softmax_cross_entropy())
    result = jaxmint.fit(
        model,
        loss,
        optax.sgd(0.1, momentum=0.9),
        train,
        steps=steps,
        batch_size=64,
        # "mesh:data=2/fsdp=4" is the mesh data=2,fsdp=4 (a comma separates strategies)
        **({"mesh": strategy[5:].replace("/", ",")} if strategy[:5] == "mesh:" else {}),
        **({} if strategy[:5] == "mesh:" else {"strategy": strategy}),
        log_every=1,
        progress=False,
        workdir=workdir,
        checkpoint_every=None,
        **extra,
    )
    state = result.state
    stats = jax.device_get(state.model_state)
    return {
        "devices": jax.device_count(),
        "loss": [r["loss"] for r in result.history],
        "params": [float(np.sum(np.abs(p))) for p in jax.tree.leaves(result.params)],
        "stats": [float(np.sum(np.abs(s))) for s in jax.tree.leaves(stats)],
        "param_bytes": sum(p.nbytes for p in jax.tree.leaves(state.params)),
        "param_bytes_per_device": sum(
            p.addressable_shards[0].data.nbytes for p in jax.tree.leaves(state.params)
        ),
        # Each leaf's PartitionSpec as a list, e.g. [] (replicated) or [null, "data"].
        "sharded": sorted(
            {
                json.dumps(list(p.sharding.spec))
                for p in jax.tree.leaves(state.params)
                if hasattr(p.sharding, "spec")
            }
        ),
    }


if __name__ == "__main__":
    main()
