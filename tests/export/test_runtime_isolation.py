"""jaxmint-runtime installs and runs on its own, one backend extra at a time.

Each case makes a fresh virtualenv, ``pip install``s ``export[EXTRA]`` into it (not
editable) and runs a check script there with a bare environment:

* ``xla``: the version-1 golden artifact (XLA only) still loads and predicts, with
  no flax, optax, orbax or jaxmint installed.
* ``onnx`` and ``iree``: an artifact exported here with all three targets loads with
  ``backend="auto"`` onto the one installed runtime, matches jax's outputs, and
  names the pip command when asked for XLA; jax is neither installed nor imported.
  ``jaxmint-bench`` runs from that venv too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests/golden/digits_v1"
GOLDEN_EXPECTED = GOLDEN.parent / "digits_v1.expected.json"

PIP_TIMEOUT_S = 900
CHILD_TIMEOUT_S = 300
# Venv creation and pip install, then the checks; above pytest's default 600 s.
TEST_TIMEOUT_S = PIP_TIMEOUT_S + 2 * CHILD_TIMEOUT_S

TRAINING_DISTRIBUTIONS = {"flax", "optax", "orbax-checkpoint", "jaxmint"}
JAX_DISTRIBUTIONS = {"jax", "jaxlib"}

# Runs in the fresh venv: ARTIFACT EXPECTED_JSON BACKEND ATOL.
CHECK = """
import importlib.util, json, sys
import numpy as np
import jaxmint_runtime

artifact, expected_file, backend, atol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
jax_free = backend != "xla"
absent = ["flax", "optax", "orbax", "jaxmint", "sklearn"] + (["jax", "jaxlib"] if jax_free else [])
for name in absent:
    assert importlib.util.find_spec(name) is None, name + " is importable"

expected = json.load(open(expected_file))
predictor = jaxmint_runtime.load(artifact, allow_expired=True)
assert predictor.backend_name == backend, (predictor.backend_name, backend)
out = predictor(np.asarray(expected["x"], np.float32))
np.testing.assert_allclose(out, np.asarray(expected["output"]), rtol=1e-5, atol=atol)

if jax_free:
    try:
        jaxmint_runtime.load(artifact, backend="xla")
    except jaxmint_runtime.ArtifactError as e:
        assert "pip install 'jaxmint-runtime[xla]'" in str(e), str(e)
    else:
        raise AssertionError("load(backend='xla') worked without jax installed")
    jax_modules = [
        m for m in sys.modules if m.startswith("jax") and m.split(".")[0] != "jaxmint_runtime"
    ]
    assert not jax_modules, "jax modules were imported: " + ", ".join(sorted(jax_modules))

loaded = [m for m in sys.modules if m.startswith(("flax", "optax", "orbax", "jaxmint."))]
print("isolated ok", sorted({m.split(".")[0] for m in loaded}))
"""


def fresh_venv(root: Path, extra: str) -> Path:
    """A new virtualenv under ``root`` with ``jaxmint-runtime[extra]`` installed from ./export.

    pip keeps this process's environment (index, proxy and certificate settings);
    everything run in the venv afterwards gets `bare_env`.
    """
    venv = root / f"venv-{extra}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            f"{REPO / 'export'}[{extra}]",
        ],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


def installed_distributions(venv: Path) -> set[str]:
    listing = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return {p["name"].lower() for p in json.loads(listing.stdout)}


def bare_env(home: Path, extra: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    if extra == "xla":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def run_in_venv(venv: Path, args: list[str], *, home: Path, extra: str):
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        cwd=home,
        env=bare_env(home, extra),
    )


@pytest.fixture(scope="module")
def all_targets_artifact(tmp_path_factory) -> tuple[Path, Path]:
    """A small MLP exported with xla, onnx and iree, and its expected outputs from jax."""
    import jax

    from jaxmint.export import export_model
    from jaxmint.models import mlp

    root = tmp_path_factory.mktemp("artifact")
    x = np.asarray(jax.random.normal(jax.random.key(1), (8, 64)), np.float32)
    model = mlp((32,), num_outputs=10)
    variables = model.init(jax.random.key(0), x)
    artifact = export_model(
        model,
        variables,
        x,
        root / "mlp",
        name="isolation_mlp",
        targets=("xla", "onnx", "iree"),
        batch_sizes=(1, 8),
        iree_hal_targets=["llvm-cpu"],
    )
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["targets"]) == {"xla", "onnx", "iree"}, manifest["skipped_targets"]
    output = np.asarray(model.apply(variables, x, train=False))
    expected = root / "expected.json"
    expected.write_text(json.dumps({"x": x.tolist(), "output": output.tolist()}))
    return artifact, expected


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_xla_extra_loads_the_golden_artifact_without_training_code(tmp_path):
    venv = fresh_venv(tmp_path, "xla")
    run = run_in_venv(
        venv,
        ["python", "-c", CHECK, str(GOLDEN), str(GOLDEN_EXPECTED), "xla", "1e-6"],
        home=tmp_path,
        extra="xla",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "isolated ok []" in run.stdout
    assert not installed_distributions(venv) & TRAINING_DISTRIBUTIONS


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("extra", ["onnx", "iree"])
def test_jax_free_extra_runs_its_own_backend(extra, all_targets_artifact, tmp_path):
    artifact, expected = all_targets_artifact
    venv = fresh_venv(tmp_path, extra)
    assert not installed_distributions(venv) & (TRAINING_DISTRIBUTIONS | JAX_DISTRIBUTIONS)

    run = run_in_venv(
        venv,
        ["python", "-c", CHECK, str(artifact), str(expected), extra, "1e-5"],
        home=tmp_path,
        extra=extra,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "isolated ok []" in run.stdout

    bench = run_in_venv(
        venv,
        [
            "jaxmint-bench",
            str(artifact),
            "--backend",
            extra,
            "--seconds",
            "0.2",
            "--batch-sizes",
            "1",
            "--no-cold-start",
        ],
        home=tmp_path,
        extra=extra,
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
