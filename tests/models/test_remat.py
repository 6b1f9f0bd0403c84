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


def _stacked(params, layers):
    """An unrolled transformer's parameters in the scanned layout (blocks on a layers axis)."""
    p = dict(params["params"])
    blocks = [p.pop(f"block{i}") for i in range(layers)]
    p["blocks"] = {"block": jax.tree_util.tree_map(lambda *ls: jnp.stack(ls), *blocks)}
    return {"params": p}


def test_scanned_layers_give_the_unrolled_loss_gradients_and_activations(policy="dots"):
    tokens = _tokens()
    plain = _transformer("none", num_layers=3)
    params = plain.init(jax.random.PRNGKey(0), tokens[:, :-1])
    scanned = _transformer(policy, num_layers=3, scan_layers=True)
    stacked = _stacked(params, 3)
    fresh = scanned.init(jax.random.PRNGKey(0), tokens[:, :-1])
    shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
    assert shapes(fresh) == shapes(stacked)  # each block's weights, stacked by layer

    want_loss, want_grads = jax.jit(jax.value_and_grad(_loss_fn(plain, tokens)))(params)
    loss_fn = _loss_fn(scanned, tokens)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(stacked)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
        grads,
        _stacked(want_grads, 3),
    )
    # One block in the program, run by a loop; remat, where asked, inside it.
    eqns = jax.make_jaxpr(jax.grad(loss_fn))(stacked).jaxpr.eqns
    assert sum(e.primitive.name == "scan" for e in eqns) == 2  # forward and backward
    assert "remat2" in str(eqns)

    # Sown activations: one array stacked by layer instead of block{i}_out.
    _, want = plain.apply_with_state(params, tokens[:, :-1])
    _, got = scanned.apply_with_state(stacked, tokens[:, :-1])
    (stacked_out,) = got["intermediates"]["blocks"]["block_out"]
    for i in range(3):
        (layer_out,) = want["intermediates"][f"block{i}_out"]
        np.testing.assert_allclose(stacked_out[i], layer_out, rtol=1e-5, atol=1e-6)


def test_scanned_layers_carry_a_layers_axis_name_that_the_rules_keep_whole():
    from jaxmint.train import DEFAULT_RULES

    tokens = _tokens()
    model = _transformer("none", scan_layers=True)
    names = model.logical_axes(jax.random.PRNGKey(0), tokens[:, :-1])
    qkv = names["['params']['blocks']['block']['qkv']['kernel']"]
    assert qkv == ("layers", "embed", None, "heads", "kv")
    assert "layers" not in DEFAULT_RULES  # a name the rules do not list is never split
