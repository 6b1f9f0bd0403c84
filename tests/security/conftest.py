"""Fixtures for the attack tests: one genuine artifact, copied for each attack."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmint
import jaxmint_runtime
from jaxmint.export import export_model


def _model():
    def init(key, x):
        return {"w": jax.random.normal(key, (x.shape[-1], 3)) * 0.1, "b": jnp.zeros(3)}

    return jaxmint.Model(init, lambda p, x, **kw: jnp.tanh(x @ p["w"] + p["b"]))


@pytest.fixture(scope="session")
def sample():
    return np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_model():
    return _model()


@pytest.fixture(scope="session")
def genuine(tmp_path_factory, sample, tiny_model):
    """A genuine artifact with precompiled executables for this machine."""
    model = tiny_model
    variables = model.init(jax.random.PRNGKey(0), sample)
    out = tmp_path_factory.mktemp("genuine") / "tiny"
    export_model(model, variables, sample, out, name="tiny", batch_sizes=(1, 4))
    expected = np.asarray(model.apply(variables, sample))
    return out, expected


@pytest.fixture
def attack(tmp_path, genuine):
    """A fresh copy of the genuine artifact to tamper with."""
    copy = tmp_path / "artifact"
    shutil.copytree(genuine[0], copy)
    return copy


@pytest.fixture
def still_works(genuine, sample):
    """After an attack, the genuine artifact still loads and predicts in the same cache."""

    def check():
        predictor = jaxmint_runtime.load(genuine[0])
        np.testing.assert_allclose(predictor(sample), genuine[1], rtol=1e-5, atol=1e-6)

    return check
