"""chunked_cross_entropy: the plain cross-entropy's values and updates, without the
whole logits in the compiled step, and errors that name what is missing."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint import losses
from jaxmint.losses import LossError, LossInputs
from jaxmint.steps import build_steps

VOCAB, LENGTH, BATCH = 61, 21, 3  # a length that 8-position chunks do not divide


@pytest.fixture(scope="module")
def model():
    return jaxmint.models.transformer(VOCAB, max_len=24, d_model=32, num_layers=2, num_heads=4)


def _batch(length=LENGTH, vocab=VOCAB, batch=BATCH):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    mask = np.ones((batch, length), bool)
    mask[0, 5:] = False  # padding in the first example
    return {"x": tokens[:, :-1], "y": tokens[:, 1:], "mask": mask}


def _steps(model, loss):
    return build_steps(model, loss, optax.adam(1e-2))


def test_three_steps_match_the_plain_cross_entropy(model):
    """With a token mask and label smoothing (the plain path is the same without)."""
    batch = _batch()
    plain = _steps(model, losses.softmax_cross_entropy(where="mask", label_smoothing=0.1))
    chunked = _steps(
        model, losses.chunked_cross_entropy(chunk=8, where="mask", label_smoothing=0.1)
    )
    state_a = plain.init(jax.random.key(0), batch)
    state_b = chunked.init(jax.random.key(0), batch)
    step_a, step_b = jax.jit(plain.train_step), jax.jit(chunked.train_step)
    for _ in range(3):
        state_a, logs_a = step_a(state_a, batch)
        state_b, logs_b = step_b(state_b, batch)
        np.testing.assert_allclose(logs_b["loss/ce"], logs_a["loss/ce"], rtol=1e-5)
        np.testing.assert_allclose(logs_b["grad_norm"], logs_a["grad_norm"], rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
        state_a.params,
        state_b.params,
    )
    evaluated = jax.jit(chunked.eval_step)(state_b, batch, BATCH)
    expected = jax.jit(plain.eval_step)(state_b, batch, BATCH)
    np.testing.assert_allclose(evaluated["loss/ce"], expected["loss/ce"], rtol=1e-5)


class _UntiedLM(nn.Module):
    """A user's language model: its own embedding, an untied Dense head."""

    @nn.compact
    def __call__(self, tokens, train=False):
        h = nn.Dense(16, name="mix")(nn.Embed(VOCAB, 16, name="embed")(tokens))
        self.sow("intermediates", "last", h)
        return nn.Dense(VOCAB, use_bias=False, name="head")(h)


def test_a_users_untied_dense_head_by_its_kernel():
    model = jaxmint.models.from_linen(_UntiedLM())
    batch = _batch()
    inputs = _inputs(model, batch)
    chunked = losses.chunked_cross_entropy(hidden="last", weight="head/kernel", layout="DxV")
    np.testing.assert_allclose(
        chunked(inputs)[0], losses.softmax_cross_entropy()(inputs)[0], rtol=1e-5
    )
    as_table = losses.chunked_cross_entropy(hidden="last", weight="head/kernel")
    with pytest.raises(LossError, match=r"\(16, 61\); expected .*pass layout='DxV'"):
        as_table(inputs)


def test_the_compiled_step_never_holds_the_whole_logits():
    """With 16384 classes over 64 positions the logits outweigh everything else: the
    plain step plans at least two copies (values and gradient), the chunked one less
    than one."""
    vocab, length = 16384, 64
    model = jaxmint.models.transformer(vocab, max_len=length, d_model=32, num_heads=4)
    batch = _batch(length, vocab, batch=4)
    logits_bytes = 4 * length * vocab * 4

    def temp_bytes(loss):
        steps = _steps(model, loss)
        state = jax.eval_shape(steps.init, jax.random.key(0), batch)
        compiled = jax.jit(steps.train_step).lower(state, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(losses.softmax_cross_entropy()) >= 2 * logits_bytes
    assert temp_bytes(losses.chunked_cross_entropy(chunk=8)) < logits_bytes


def _inputs(model, batch, **changes):
    variables = model.init(jax.random.key(0), batch["x"])
    outputs, updates = model.forward(variables, batch["x"], train=True, key=None)
    fields = dict(
        outputs=outputs,
        batch=batch,
        params=variables["params"],
        intermediates=dict(updates)["intermediates"],
    )
    return LossInputs(**{**fields, **changes})


def test_what_is_missing_or_misshapen_is_named(model):
    batch = _batch()
    inputs = _inputs(model, batch)
    term = losses.chunked_cross_entropy(hidden="last")
    with pytest.raises(LossError, match=r"intermediate 'last'.*sowed \[.*'hidden'"):
        term(inputs)
    term = losses.chunked_cross_entropy(weight="head/kernel")
    with pytest.raises(LossError, match=r"'head/kernel'.*has no 'head' \(it has \[.*'embed'"):
        term(inputs)
    with pytest.raises(LossError, match=r"integer class labels in batch\['y'\].*float32"):
        losses.chunked_cross_entropy()(_inputs(model, {**batch, "y": batch["y"] * 1.0}))
    with pytest.raises(LossError, match=r"batch\['y'\] has shape \(3, 20\).*\(3, 21\)"):
        losses.chunked_cross_entropy()(_inputs(model, {**batch, "y": batch["y"][:, 1:]}))
    with pytest.raises(ValueError, match="layout must be 'VxD' or 'DxV', got 'DV'"):
        losses.chunked_cross_entropy(layout="DV")
    with pytest.raises(ValueError, match="chunk must be a positive integer, got 0"):
        losses.chunked_cross_entropy(chunk=0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        losses.chunked_cross_entropy(label_smoothing=1.0)
