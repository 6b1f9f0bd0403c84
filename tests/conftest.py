"""Test configuration: CPU only, tiny shared fixtures."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Loading an artifact turns on JAX's persistent compilation cache; keep it out of $HOME,
# one per xdist worker (the cache tests tamper with entries another worker also uses),
# removed at the end. Every process a test starts inherits it, and the training side
# uses it too: the suite compiles the same programs many times over (the digits MLP in
# each experiment, CLI and docs run), and a hit loads the executable XLA built the first
# time, with the same numbers. Every compile is kept, however short: most of the suite's
# CPU time is XLA compiling. Tests of a cold start drop it from their processes' env.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER or "JAXMINT_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix=f"jaxmint-test-cache-{_WORKER or 'main'}-")
    os.environ["JAXMINT_CACHE_DIR"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["JAXMINT_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits():
    import jaxmint

    return jaxmint.data.digits()


@pytest.fixture
def toy():
    """A linearly separable 3-class problem, 96 examples of 5 features."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)).astype(np.float32)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    y = np.argmax(x @ w, axis=1).astype(np.int32)
    return {"x": x, "y": y}


def pytest_collection_modifyitems(items):
    """Files with slow tests first, each file's tests in order (module fixtures stay shared):
    two xdist workers then end on short tests instead of one waiting on a long one."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
