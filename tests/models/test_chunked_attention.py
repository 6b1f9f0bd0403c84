"""chunked_attention: the default attention's outputs and gradients, and a train step
whose planned memory no longer holds every head's whole score matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint.steps import build_steps


@pytest.mark.parametrize("is_causal", [True, False])
def test_outputs_and_gradients_match_the_default_attention(is_causal):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 21, 4, 8))  # 21: not a multiple of 8
    chunked = jaxmint.models.chunked_attention(8)

    def total(attention, q, k, v):
        out = attention(q, k, v, is_causal=is_causal)
        return jnp.sum(out * jnp.cos(out)), out

    (value, out), grads = jax.value_and_grad(
        lambda *a: total(jax.nn.dot_product_attention, *a), argnums=(0, 1, 2), has_aux=True
    )(q, k, v)
    (value_c, out_c), grads_c = jax.jit(
        jax.value_and_grad(lambda *a: total(chunked, *a), argnums=(0, 1, 2), has_aux=True)
    )(q, k, v)
    np.testing.assert_allclose(out_c, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value_c, value, rtol=1e-5)
    for g_c, g in zip(grads_c, grads, strict=True):
        np.testing.assert_allclose(g_c, g, rtol=1e-4, atol=1e-5)


def test_a_transformer_step_plans_one_chunk_of_scores_at_a_time():
    """Four heads over 512 positions: the default attention plans several whole score
    matrices (4 x 4 x 512 x 512 floats, 16 MiB); in 64-query chunks the step needs
    less than one, and takes the same update."""
    length = 512
    tokens = np.random.default_rng(0).integers(0, 64, (4, length + 1)).astype(np.int32)
    batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    scores_bytes = 4 * 4 * length * length * 4

    def step(attention):
        model = jaxmint.models.transformer(
            64, max_len=length, d_model=32, num_layers=1, num_heads=4, attention=attention
        )
        steps = build_steps(model, jaxmint.losses.softmax_cross_entropy(), optax.sgd(0.1))
        state = steps.init(jax.random.key(0), batch)
        compiled = jax.jit(steps.train_step).lower(state, batch).compile()
        new_state, logs = compiled(state, batch)
        return compiled.memory_analysis().temp_size_in_bytes, new_state.params, logs

    plain_bytes, plain_params, plain_logs = step(jax.nn.dot_product_attention)
    chunked_bytes, chunked_params, chunked_logs = step(jaxmint.models.chunked_attention(64))
    assert plain_bytes >= 2 * scores_bytes
    assert chunked_bytes < scores_bytes
    np.testing.assert_allclose(chunked_logs["loss"], plain_logs["loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
        plain_params,
        chunked_params,
    )


def test_a_chunk_that_is_not_a_positive_integer_is_refused():
    with pytest.raises(ValueError, match="chunk must be a positive integer, got 0"):
        jaxmint.models.chunked_attention(0)
