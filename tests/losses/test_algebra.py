"""The loss algebra against hand-written jnp, trace counts and error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmint import losses
from jaxmint.losses import LossError, LossInputs

B, C = 6, 4


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(B, 3)).astype(np.float32),
        "y": rng.integers(0, C, size=(B,)).astype(np.int32),
        "mask": np.array([1, 1, 0, 1, 0, 1], bool),
    }


@pytest.fixture
def logits():
    return jax.random.normal(jax.random.PRNGKey(0), (B, C))


def ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def test_cross_entropy_matches_hand_written(logits, batch):
    total, metrics = losses.softmax_cross_entropy()(LossInputs(logits, batch))
    np.testing.assert_allclose(total, ce(logits, batch["y"]).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/ce"], total)


def test_label_smoothing_matches_optax(logits, batch):
    total, _ = losses.softmax_cross_entropy(label_smoothing=0.1)(LossInputs(logits, batch))
    targets = optax.smooth_labels(jax.nn.one_hot(batch["y"], C), 0.1)
    want = -(targets * jax.nn.log_softmax(logits)).sum(-1).mean()
    np.testing.assert_allclose(total, want, rtol=1e-6)


def test_sum_scale_and_where_mask(logits, batch):
    a = losses.softmax_cross_entropy(where="mask")
    z = losses.z_loss()
    loss = a + 0.5 * z
    total, metrics = loss(LossInputs(logits, batch))
    m = batch["mask"].astype(np.float32)
    want_a = (ce(logits, batch["y"]) * m).sum() / m.sum()
    want_z = (jax.nn.logsumexp(logits, -1) ** 2).mean()
    np.testing.assert_allclose(total, want_a + 0.5 * want_z, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/ce"], want_a, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/z_loss"], want_z, rtol=1e-6)
    np.testing.assert_allclose(metrics["weight/z_loss"], 0.5)


def test_masked_named_and_subtraction(logits, batch):
    mse = losses.mse(targets="t")
    inputs = LossInputs(logits, {**batch, "t": np.zeros((B, C), np.float32)})
    loss = losses.named(losses.masked(mse, "mask"), "reg") - 0.0 * losses.z_loss()
    total, metrics = loss(inputs)
    per_ex = (np.asarray(logits) ** 2).mean(-1)
    want = per_ex[batch["mask"]].mean()
    np.testing.assert_allclose(total, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/reg"], want, rtol=1e-6)


def test_sum_reduction_and_token_axis():
    values = jnp.arange(12.0).reshape(3, 4)
    batch = {"x": np.zeros((3, 1), np.float32), "keep": np.array([[1, 1, 0, 0]] * 3, bool)}
    t = losses.term(lambda out, b: out, name="raw", reduction="sum")
    np.testing.assert_allclose(t(LossInputs(values, batch))[0], values.sum() / 3)
    m = losses.term(lambda out, b: out, name="raw", where="keep")
    np.testing.assert_allclose(m(LossInputs(values, batch))[0], values[:, :2].mean())


def test_stop_gradient_keeps_value_drops_gradient(batch):
    t = losses.term(lambda out, b: out.sum(-1) ** 2, name="sq")
    for loss, want_grad in ((t, True), (losses.stop_gradient(t), False)):
        g = jax.grad(lambda o, loss=loss: loss(LossInputs(o, batch))[0])(jnp.ones((B, 2)))
        assert bool(jnp.any(g != 0)) is want_grad


def test_schedule_weight_never_recompiles(logits, batch):
    traces = []

    def fn(out, b):
        traces.append(1)
        return jnp.sum(out, -1)

    loss = optax.linear_schedule(0.0, 1.0, 10) * losses.term(fn, name="s")
    state = loss.init()

    @jax.jit
    def evaluate(step, weights):
        return loss(LossInputs(logits, batch, step=step), weights)[0]

    values = [float(evaluate(jnp.asarray(s), state)) for s in range(10)]
    assert len(traces) == 1
    assert evaluate._cache_size() == 1
    base = float(jnp.sum(logits, -1).mean())
    np.testing.assert_allclose(values, [base * s / 10 for s in range(10)], rtol=1e-5, atol=1e-6)


def test_constant_weights_live_in_state_so_changes_do_not_recompile(logits, batch):
    loss = 0.1 * losses.z_loss()
    state = loss.init()
    assert next(iter(state["weights"].values())).shape == ()
    f = jax.jit(lambda s: loss(LossInputs(logits, batch), s)[0])
    a = f(state)
    state2 = jax.tree.map(lambda w: w * 2, state)
    b = f(state2)
    np.testing.assert_allclose(b, 2 * a, rtol=1e-6)
    assert f._cache_size() == 1


def test_intermediate_term_reads_sown_activations(batch):
    inter = {"act0": (jnp.ones((B, 3)) * 2.0,)}
    t = losses.term(lambda i, b: jnp.mean(i["act0"][0] ** 2, -1), name="act", on="intermediates")
    np.testing.assert_allclose(t(LossInputs(None, batch, intermediates=inter))[0], 4.0)


def test_an_inputs_term_reads_outputs_params_and_intermediates_at_once(logits, batch):
    params = {"scale": jnp.asarray(3.0)}
    inter = {"act0": (jnp.ones((B, 2)),)}

    def fn(inputs):
        act = inputs.intermediates["act0"][0].sum(-1)  # 2 per example
        return inputs.params["scale"] * act + 0.0 * inputs.outputs.sum(-1)

    t = losses.term(fn, name="mixed", on="inputs", where="mask")
    total, metrics = t(LossInputs(logits, batch, params=params, intermediates=inter))
    np.testing.assert_allclose(total, 6.0)
    assert metrics["loss/mixed"] == total
    missing = losses.term(lambda inputs: inputs.intermediates["nope"][0], name="m", on="inputs")
    with pytest.raises(LossError, match=r"reads key 'nope'.*intermediates have keys \['act0'\]"):
        missing(LossInputs(logits, batch, intermediates=inter))


def test_l2_default_and_masks():
    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}}
    inputs = LossInputs(None, {"x": np.zeros((1, 1))}, params=params)
    assert float(losses.l2()(inputs)[0]) == pytest.approx(3.0)
    everything = losses.l2(mask=lambda path, leaf: True)
    assert float(everything(inputs)[0]) == pytest.approx(4.5)
    tree_mask = {"dense": {"kernel": False, "bias": True}}
    assert float(losses.l2(mask=tree_mask)(inputs)[0]) == pytest.approx(1.5)
    by_path = losses.l2(mask=lambda path, leaf: path.endswith("bias"))
    assert float(by_path(inputs)[0]) == pytest.approx(1.5)


def test_builtins_regression(batch):
    preds = jnp.array([[0.0], [2.0], [4.0], [1.0], [0.5], [3.0]])
    inputs = LossInputs(preds, {**batch, "y": np.zeros((B, 1), np.float32)})
    np.testing.assert_allclose(losses.mse()(inputs)[0], (np.asarray(preds) ** 2).mean())
    want = optax.huber_loss(preds, jnp.zeros_like(preds), delta=1.0).mean()
    np.testing.assert_allclose(losses.huber()(inputs)[0], want, rtol=1e-6)
    bin_in = LossInputs(preds, {**batch, "y": np.ones((B, 1), np.float32)})
    want = optax.sigmoid_binary_cross_entropy(preds, jnp.ones_like(preds)).mean()
    np.testing.assert_allclose(losses.sigmoid_binary_cross_entropy()(bin_in)[0], want, rtol=1e-6)


def test_uncertainty_weighting_value_and_learning(logits, batch):
    a = losses.softmax_cross_entropy()
    z = losses.z_loss()
    loss = losses.uncertainty_weighted(a, z)
    state = loss.init()
    # Learned log-variances are keyed by the names of the losses they weigh, not by position.
    assert state["params"] == {"uncertainty(ce,z_loss)": {"ce": 0.0, "z_loss": 0.0}}
    path = "uncertainty(ce,z_loss)"
    state["params"][path] = {"ce": jnp.array(0.5), "z_loss": jnp.array(-1.0)}
    total, metrics = loss(LossInputs(logits, batch), state)
    la, lz = metrics["loss/ce"], metrics["loss/z_loss"]
    want = 0.5 * np.exp(-0.5) * la + 0.25 + 0.5 * np.exp(1.0) * lz - 0.5
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["weight/z_loss"], 0.5 * np.exp(1.0), rtol=1e-6)
    grad = jax.grad(lambda p: loss(LossInputs(logits, batch), {**state, "params": p})[0])(
        state["params"]
    )
    assert all(np.asarray(g) != 0 for g in grad[path].values())


def test_error_wrong_term_shape_names_term(logits, batch):
    bad = losses.term(lambda out, b: out.mean(), name="oops")
    with pytest.raises(LossError, match=r"'oops'.*leading batch axis of size 6, got shape \(\)"):
        bad(LossInputs(logits, batch))


def test_error_missing_key_names_key_and_term(logits, batch):
    with pytest.raises(LossError, match=r"'ce' reads key 'labels'.*'mask', 'x', 'y'"):
        losses.softmax_cross_entropy(labels="labels")(LossInputs(logits, batch))


def test_error_float_labels_and_label_shape(logits, batch):
    with pytest.raises(LossError, match="integer class labels"):
        losses.softmax_cross_entropy()(LossInputs(logits, {**batch, "y": batch["y"] * 1.0}))
    with pytest.raises(LossError, match=r"shape \(6, 2\).*expected labels of shape \(6,\)"):
        losses.softmax_cross_entropy()(
            LossInputs(logits, {**batch, "y": np.zeros((B, 2), np.int32)})
        )


def test_error_duplicate_names_and_non_scalar_regularizer(batch):
    with pytest.raises(LossError, match="both named 'ce'"):
        (losses.softmax_cross_entropy() + losses.softmax_cross_entropy()).init()
    reg = losses.term(lambda p: p["w"], name="reg", on="params")
    inputs = LossInputs(None, batch, params={"w": jnp.ones(3)})
    with pytest.raises(LossError, match=r"'reg'.*must return a scalar, got shape \(3,\)"):
        reg(inputs)


def test_construction_errors():
    with pytest.raises(ValueError, match="non-empty name"):
        losses.term(lambda o, b: o, name="a/b")
    with pytest.raises(ValueError, match="on="):
        losses.term(lambda o, b: o, name="a", on="labels")
    with pytest.raises(TypeError, match="not by another loss"):
        losses.z_loss() * losses.z_loss()
    with pytest.raises(ValueError, match="at least two"):
        losses.uncertainty_weighted(losses.z_loss())


def test_sum_flattens_and_python_sum_works():
    terms = [losses.term(lambda o, b: o, name=f"t{i}") for i in range(3)]
    total = sum(terms)
    assert total.term_names == ["t0", "t1", "t2"]


def test_sum_reduction_with_mask_averages_over_unmasked_examples():
    values = jnp.arange(6.0).reshape(3, 2)
    batch = {"x": np.zeros((3, 1), np.float32), "keep": np.array([True, False, True])}
    t = losses.term(lambda out, b: out, name="s", reduction="sum", where="keep")
    np.testing.assert_allclose(t(LossInputs(values, batch))[0], (1 + 9) / 2)


def test_uncertainty_weighting_names_scaled_children():
    loss = losses.uncertainty_weighted(0.5 * losses.z_loss(), losses.softmax_cross_entropy())
    assert loss._names() == ["z_loss", "ce"]
