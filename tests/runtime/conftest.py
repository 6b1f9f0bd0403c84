"""Fixtures: one small digits artifact per session, servers on 127.0.0.1 port 0."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import build_artifact

import jaxmint_runtime
from jaxmint_runtime.serve import Server


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("artifacts") / "digits")


@pytest.fixture(scope="session")
def predictor(artifact):
    return jaxmint_runtime.load(artifact)


@pytest.fixture(scope="session")
def inputs():
    """Distinct rows: row i answers request i, so a mixed-up split shows."""
    return np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)


@pytest.fixture
def make_server(predictor):
    """Start servers with config overrides; every one is stopped at teardown."""
    started = []

    def make(**overrides) -> Server:
        server = Server([predictor], port=0, **overrides).start()
        started.append(server)
        return server

    yield make
    for server in started:
        assert server.stop(timeout=10), "the server did not drain within 10 s"


@pytest.fixture
def server(make_server):
    return make_server()
