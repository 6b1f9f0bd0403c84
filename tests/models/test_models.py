"""Models: adapters agree with flax's own apply; built-ins; plain-function models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmint
from jaxmint.models._zoo import CNN, MLP


def test_from_linen_matches_flax_apply_and_collects_intermediates():
    module = MLP((8, 8), 3)
    model = jaxmint.models.from_linen(module)
    x = jnp.ones((4, 5))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert "intermediates" not in variables
    want = module.apply(variables, x)
    np.testing.assert_allclose(model.apply(variables, x), want, rtol=1e-6)
    out, updates = model.forward(variables, x, train=False, key=None)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert set(updates["intermediates"]) == {"act0", "act1"}


def test_from_linen_batch_norm_state_updates_only_in_training():
    module = CNN((4,), 3)
    model = jaxmint.models.from_linen(module)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert "batch_stats" in variables
    out, updates = model.forward(variables, x, train=True, key=None)
    want, want_updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        updates["batch_stats"],
        want_updates["batch_stats"],
    )
    _, eval_updates = model.forward(variables, x, train=False, key=None)
    assert "batch_stats" not in eval_updates


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(5, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.lin(x)))
        self.sow(nnx.Intermediate, "hidden", h)
        return self.out(h)


def test_from_nnx_matches_module_call_and_threads_batch_stats():
    model = jaxmint.models.from_nnx(_NNXNet)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
    variables = model.init(jax.random.PRNGKey(0), x)
    reference = _NNXNet(nnx.Rngs(jax.random.PRNGKey(0)))
    reference.eval()
    np.testing.assert_allclose(model.apply(variables, x), reference(x), rtol=1e-5, atol=1e-6)

    out, updates = model.forward(variables, x, train=True, key=None)
    reference.train()
    np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-6)
    new_mean = updates["state"]["bn"]["mean"]
    np.testing.assert_allclose(new_mean, reference.bn.mean[...], rtol=1e-5, atol=1e-7)
    assert "hidden" in updates["intermediates"]


def test_from_nnx_instance_and_jit():
    module = nnx.Linear(5, 2, rngs=nnx.Rngs(0))
    model = jaxmint.models.from_nnx(module)
    x = jnp.ones((3, 5))
    variables = model.init(jax.random.PRNGKey(9), x)
    np.testing.assert_allclose(jax.jit(model.apply)(variables, x), module(x), rtol=1e-6)


def test_plain_function_model_trains(toy):
    def init(key, x):
        return {"params": {"w": 0.01 * jax.random.normal(key, (x.shape[-1], 3))}}

    def apply(variables, x, *, train=False, key=None):
        return x @ variables["params"]["w"]

    model = jaxmint.Model(init, apply)
    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(0.1),
        toy,
        steps=60,
        batch_size=32,
        progress=False,
        eval_data=toy,
        metrics={"accuracy": jaxmint.metrics.accuracy()},
    )
    assert result.final_eval["eval/accuracy"] > 0.9


def _reference_attention(q, k, v, *, is_causal):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    if is_causal:
        n = q.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def test_transformer_custom_attention_matches_default():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 50)
    default = jaxmint.models.transformer(50, max_len=16, d_model=16, num_layers=1, num_heads=2)
    custom = jaxmint.models.transformer(
        50, max_len=16, d_model=16, num_layers=1, num_heads=2, attention=_reference_attention
    )
    variables = default.init(jax.random.PRNGKey(1), tokens)
    a = default.apply(variables, tokens)
    b = custom.apply(variables, tokens)
    assert a.shape == (2, 16, 50)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    portable = jaxmint.models.transformer(
        50,
        max_len=16,
        d_model=16,
        num_layers=1,
        num_heads=2,
        attention=jaxmint.models.portable_attention,
    )
    np.testing.assert_allclose(portable.apply(variables, tokens), a, rtol=1e-5, atol=1e-6)


def test_transformer_is_causal():
    model = jaxmint.models.transformer(20, max_len=8, d_model=16, num_layers=1, num_heads=2)
    tokens = jnp.arange(8)[None] % 20
    variables = model.init(jax.random.PRNGKey(0), tokens)
    changed = tokens.at[0, -1].set(3)
    a, b = model.apply(variables, tokens), model.apply(variables, changed)
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-6)


def test_transformer_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        jaxmint.models.transformer(10, d_model=10, num_heads=3)
    model = jaxmint.models.transformer(10, max_len=4, d_model=8, num_heads=2, num_layers=1)
    with pytest.raises(ValueError, match="max_len 4"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))


def test_init_without_params_collection_trains_the_whole_tree(toy):
    model = jaxmint.Model(lambda k, x: {"w": jnp.zeros((5, 3))}, lambda v, x, **kw: x @ v["w"])
    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.sgd(0.1),
        toy,
        steps=2,
        batch_size=8,
        progress=False,
    )
    assert set(result.params) == {"w"} and np.abs(result.params["w"]).sum() > 0


def test_linen_module_with_deterministic_kwarg():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic: bool = True):
            return nn.Dropout(0.5, deterministic=deterministic)(nn.Dense(4)(x))

    model = jaxmint.models.from_linen(Drop())
    x = jnp.ones((2, 3))
    v = model.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(model.apply(v, x), model.apply(v, x))
    a = model.apply(v, x, train=True, key=jax.random.PRNGKey(1))
    assert np.any(np.asarray(a) == 0.0)
