"""A model whose init returns a plain pytree: the whole tree is its parameters."""

import dataclasses
import functools
import importlib.util
import signal
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
import jaxmint_runtime
from jaxmint import losses
from jaxmint.export import export_model
from jaxmint.run import load_params

CHECKPOINT_TESTS = Path(__file__).parents[1] / "checkpoint"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, CHECKPOINT_TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trainer = _load("trainer")
plain_mlp = trainer.plain_mlp


def _train(data, workdir, model=None, steps=300, eval_data=None, **kw):
    return jaxmint.fit(
        model or plain_mlp(),
        losses.softmax_cross_entropy(),
        optax.adam(3e-3),
        data,
        steps=steps,
        batch_size=64,
        workdir=workdir,
        eval_data=eval_data,
        metrics={"accuracy": jaxmint.metrics.accuracy()},
        progress=False,
        **kw,
    )


def test_plain_pytree_model_learns_digits_like_the_builtin_mlp(tmp_path, digits):
    train, test = digits
    plain = _train(train, tmp_path / "plain", eval_data=test, checkpoint_every=150)
    builtin = _train(train, None, model=jaxmint.models.mlp((64,), num_outputs=10), eval_data=test)
    assert set(plain.params) == {"w1", "b1", "w2", "b2"}
    acc, ref = plain.final_eval["eval/accuracy"], builtin.final_eval["eval/accuracy"]
    assert acc > 0.9 and abs(acc - ref) < 0.03, (acc, ref)

    weights, step = load_params(tmp_path / "plain")
    assert step == 300 and set(weights["params"]) == {"w1", "b1", "w2", "b2"}
    out = export_model(
        plain_mlp(),
        weights["params"],
        test["x"][:4],
        tmp_path / "art",
        name="plain",
        precompile=False,
    )
    predictor = jaxmint_runtime.load(out)
    expected = plain_mlp().apply(weights["params"], test["x"][:5])
    np.testing.assert_allclose(predictor(test["x"][:5]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_plain_pytree_model_resumes_bit_identically_after_a_kill(tmp_path):
    resume = _load("test_resume")
    reference = tmp_path / "reference"
    resume.finish(resume.start(reference, model="plain"))
    workdir = tmp_path / "run"
    proc = resume.start(workdir, model="plain")
    resume.wait_for_step(proc, 14)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    out, _ = resume.finish(resume.start(workdir, model="plain"))
    assert f"resuming {workdir}" in out
    got, want = resume.final_params(workdir), resume.final_params(reference)
    assert got.keys() == want.keys() == {"['w1']", "['b1']", "['w2']", "['b2']"}
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_plain_pytree_model_summary_diagnosis_and_debug(tmp_path, toy):
    model = plain_mlp(hidden=16, classes=3)
    summary = jaxmint.models.summary(model, toy, show=False)
    assert all(name in str(summary) for name in ("w1", "b1", "w2", "b2"))
    result = _train(toy, tmp_path / "d", model=model, steps=20, diagnose_every=10)
    keys = [k for k in result.history[-1] if k.startswith("diag/layer_grad_norm/")]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["b1", "b2", "w1", "w2"]
    debug = _train(toy, tmp_path / "dbg", model=model, steps=3, debug=True)
    assert debug.history[-1]["step"] == 3
    inspection = jaxmint.debug.inspect_step(
        model,
        losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        {k: v[:8] for k, v in toy.items()},
        result.params,
    )
    assert set(inspection.grad_norms["ce"]) == {"w1", "b1", "w2", "b2"}


def test_plain_pytree_nonfinite_report_names_the_parameter(tmp_path, toy):
    def apply(p, x, *, train=False, key=None):
        return x @ p["w"] * jnp.where(jnp.sum(p["w"]) > -1e9, jnp.nan, 1.0)

    model = jaxmint.Model(lambda k, x: {"w": jnp.ones((x.shape[-1], 3))}, apply)
    with pytest.raises(jaxmint.train.NonFiniteError, match=r"\['w'\]|'w'"):
        _train(toy, tmp_path / "nan", model=model, steps=3)


class Linear(NamedTuple):
    w: jax.Array
    b: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "b"], meta_fields=[])
@dataclasses.dataclass
class LinearDC:
    w: jax.Array
    b: jax.Array


CONTAINERS = {
    "list": lambda w, b: [w, b],
    "tuple": lambda w, b: (w, b),
    "namedtuple": Linear,
    "dataclass": LinearDC,
}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_any_pytree_container_trains_checkpoints_and_resumes(tmp_path, toy, kind):
    make = CONTAINERS[kind]

    def apply(p, x, *, train=False, key=None):
        w, b = jax.tree.leaves(p)  # [w, b] in every container here
        return x @ w + b

    model = jaxmint.Model(lambda k, x: make(jnp.zeros((x.shape[-1], 3)), jnp.zeros(3)), apply)
    first = _train(toy, tmp_path, model=model, steps=10, checkpoint_every=5)
    assert type(first.params) is type(make(0, 0))
    resumed = _train(toy, tmp_path, model=model, steps=20)
    assert resumed.history[-1]["step"] == 20 and np.isfinite(resumed.history[-1]["loss"])
    assert type(resumed.state.params) is type(make(0, 0))
