"""inspect_step against a hand computation, and `jaxmint inspect-step RUN_DIR`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmint
from jaxmint import losses
from jaxmint.debug import inspect_step


def linear():
    def init(key, x):
        k1, k2 = jax.random.split(key)
        return {
            "params": {
                "w": {"kernel": jax.random.normal(k1, (x.shape[-1], 2))},
                "b": {"bias": jax.random.normal(k2, (2,))},
            }
        }

    def apply(v, x, *, train=False, key=None):
        return x @ v["params"]["w"]["kernel"] + v["params"]["b"]["bias"]

    return jaxmint.Model(init, apply)


def test_inspect_step_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(6, 4)).astype(np.float32),
        "t": rng.normal(size=(6, 2)).astype(np.float32),
    }
    sq = lambda out, b: jnp.sum((out - b["t"]) ** 2, axis=-1)
    ab = lambda out, b: jnp.sum(jnp.abs(out), axis=-1)
    loss = losses.term(sq, name="sq") + 0.5 * losses.term(ab, name="ab")
    model = linear()
    params = model.init(jax.random.PRNGKey(1), batch["x"])["params"]

    report = inspect_step(model, loss, optax.sgd(0.1), batch, params)

    out = batch["x"] @ params["w"]["kernel"] + params["b"]["bias"]
    np.testing.assert_allclose(report.outputs, out, rtol=1e-6)

    def term_value(fn):
        return lambda p: jnp.mean(fn(model.apply({"params": p}, batch["x"]), batch))

    for name, fn in (("sq", sq), ("ab", ab)):
        np.testing.assert_allclose(report.terms[name], term_value(fn)(params), rtol=1e-6)
        grads = jax.grad(term_value(fn))(params)
        for layer in ("w", "b"):
            norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads[layer])))
            np.testing.assert_allclose(report.grad_norms[name][layer], norm, rtol=1e-5)
    total = lambda p: term_value(sq)(p) + 0.5 * term_value(ab)(p)
    np.testing.assert_allclose(report.total, total(params), rtol=1e-6)
    assert report.weights == {"ab": 0.5}
    grads = jax.grad(total)(params)
    for got, want in zip(jax.tree.leaves(report.update), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, -0.1 * np.asarray(want), rtol=1e-5, atol=1e-7)
    assert isinstance(report.update["w"]["kernel"], np.ndarray)
    text = str(report)
    assert "sq" in text and "ab (x0.5)" in text and "|update|" in text


def test_inspect_step_reports_sown_intermediates(toy):
    model = jaxmint.models.mlp([8, 4], num_outputs=3)
    batch = {k: v[:5] for k, v in toy.items()}
    report = inspect_step(model, losses.softmax_cross_entropy(), optax.sgd(1e-3), batch)
    shapes = {k: np.shape(v[0]) for k, v in report.intermediates.items()}
    assert shapes == {"act0": (5, 8), "act1": (5, 4)}
    assert set(report.grad_norms["ce"]) == {"dense0", "dense1", "head"}


def test_public_names_resolve():
    for name in jaxmint.debug.__all__:
        assert hasattr(jaxmint.debug, name), name
    for name in ("summary", "ModelSummary", "LayerSummary"):
        assert name in jaxmint.models.__all__


def test_inspect_step_gives_a_verdict_in_plain_words(toy):
    model = jaxmint.models.mlp([16], num_outputs=3)
    batch = {k: v[:32] for k, v in toy.items()}
    loss = losses.softmax_cross_entropy() + 1e-4 * losses.l2()

    healthy = inspect_step(model, loss, optax.adam(1e-3), batch)
    assert healthy.flags == [] and "verdict:\n  no known pathology found" in str(healthy)

    too_high = inspect_step(model, loss, optax.sgd(300.0), batch)
    assert too_high.flags[0].code == "update-ratio-high", str(too_high)
    assert "likely cause: [update-ratio-high]" in str(too_high)
    assert "learning rate is likely too high" in str(too_high)

    too_low = inspect_step(model, loss, optax.sgd(1e-7), batch)
    assert {f.code for f in too_low.flags} == {"update-ratio-low"}

    # A data term that drowns the others; weight decay is a regularizer, judged apart.
    drowned = losses.softmax_cross_entropy() + 1e3 * losses.z_loss() + 1e-4 * losses.l2()
    assert "dominant-term" in {
        f.code for f in inspect_step(model, drowned, optax.adam(1e-3), batch).flags
    }
