"""jaxmint-runtime installs and runs on its own: no flax, optax, orbax or jaxmint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests/golden/digits_v1"

CHECK = """
import importlib.util, json, sys
import numpy as np
import jaxmint_runtime
for name in ("flax", "optax", "orbax", "jaxmint", "sklearn"):
    assert importlib.util.find_spec(name) is None, name + " is importable"
expected = json.load(open(sys.argv[2]))
predictor = jaxmint_runtime.load(sys.argv[1], allow_expired=True)
out = predictor(np.asarray(expected["x"], np.float32))
np.testing.assert_allclose(out, np.asarray(expected["output"]), rtol=1e-5, atol=1e-6)
loaded = [m for m in sys.modules if m.startswith(("flax", "optax", "orbax", "jaxmint."))]
print("isolated ok", sorted(m.split(".")[0] for m in loaded))
"""


@pytest.mark.slow
def test_runtime_alone_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(REPO / "export"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    run = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            CHECK,
            str(GOLDEN),
            str(GOLDEN.parent / "digits_v1.expected.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "isolated ok []" in run.stdout
    installed = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert not names & {"flax", "optax", "orbax-checkpoint", "jaxmint"}
