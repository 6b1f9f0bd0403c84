"""Rematerialization: same loss and gradients as without it, less memory kept for backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint.models._remat import POLICIES

LENGTH, VOCAB = 32, 64


def _tokens(batch=4, length=LENGTH):
    return np.random.default_rng(0).integers(0, VOCAB, (batch, length + 1)).astype(np.int32)


def _loss_fn(model, tokens):
    def loss(params):
        logits = model.apply(params, tokens[:, :-1], train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss


def _transformer(remat, **kwargs):
    shape = dict(max_len=LENGTH, d_model=32, num_layers=2, num_heads=4)
    return jaxmint.models.transformer(VOCAB, remat=remat, **shape | kwargs)


def test_remat_gives_the_same_loss_and_gradients(policy="full"):
    tokens = _tokens()
    plain = _transformer("none")
    params = plain.init(jax.random.PRNGKey(0), tokens[:, :-1])
    rematted = _transformer(policy)
    # The same parameter tree: a checkpoint of one restores into the other.
    fresh = rematted.init(jax.random.PRNGKey(0), tokens[:, :-1])
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)

    want_loss, want_grads = jax.jit(jax.value_and_grad(_loss_fn(plain, tokens)))(params)
    loss_fn = _loss_fn(rematted, tokens)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), grads, want_grads
    )
    # The backward pass really recomputes: jax.checkpoint (remat2) is in the program.
    eqns = jax.make_jaxpr(jax.grad(loss_fn))(params).jaxpr.eqns
    assert sum(e.primitive.name == "remat2" for e in eqns) == 2  # one per block


def residual_bytes(model, tokens) -> int:
    """Bytes the forward pass keeps for the backward pass: the residuals in jax.vjp's closure."""
    params = model.init(jax.random.PRNGKey(0), tokens[:, :-1])
    _, backward = jax.vjp(_loss_fn(model, tokens), params)
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(backward))


def test_remat_keeps_less_activation_memory_for_the_backward_pass():
    tokens = _tokens(batch=8, length=64)
    kept = {p: residual_bytes(_transformer(p, max_len=64), tokens) for p in POLICIES}
    assert kept["full"] < 0.1 * kept["none"], kept
    assert kept["full"] < kept["dots_no_batch"] < kept["dots"] < kept["none"], kept


def test_remat_wraps_a_users_linen_block_and_a_function():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(x.shape[-1])(x)))

    class Net(nn.Module):
        policy: str

        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = jaxmint.models.remat(Block, self.policy)(name=f"block{i}")(x)
            return x.sum()

    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)), jnp.float32)
    params = Net("none").init(jax.random.PRNGKey(0), x)
    want = jax.grad(lambda p: Net("none").apply(p, x))(params)
    got = jax.grad(lambda p: Net("dots").apply(p, x))(params)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)

    def f(w, x):
        return jnp.sum(jnp.sin(x @ w) ** 2)

    w = jnp.ones((8, 8)) * 0.1
    g = jax.grad(jaxmint.models.remat(f, "full"))(w, x)
    np.testing.assert_allclose(g, jax.grad(f)(w, x), rtol=1e-6)
    assert jaxmint.models.remat(f, "none") is f


def test_an_unknown_remat_policy_names_the_choices():
    with pytest.raises(ValueError, match="unknown remat policy 'dot'.*dots_no_batch"):
        _transformer("dot")
    with pytest.raises(TypeError, match="module class or a function"):
        jaxmint.models.remat(3, "full")
    assert set(POLICIES) == {"none", "full", "dots", "dots_no_batch"}
