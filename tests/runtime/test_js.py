"""The ONNX target in Node.js: export/js (jaxmint-runtime-js) under ``node --test``.

The Node tests load the committed golden artifact and a digits model exported
here, whose Python runtime outputs this test records for them to match; they also
refuse hostile artifacts and bad inputs. `scripts/setup.sh` installs the npm
packages (``npm ci`` in export/js).
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import train_digits

import jaxmint_runtime
from jaxmint.export import export_model

REPO = Path(__file__).resolve().parents[2]
JS = REPO / "export/js"
GOLDEN = REPO / "tests/golden/digits_onnx_v2"


def node_ready() -> str | None:
    """Why the Node tests cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (Node.js 20 or later runs export/js)"
    if not (JS / "node_modules/onnxruntime-node").is_dir():
        return "export/js has no node_modules: bash scripts/setup.sh runs npm ci there"
    return None


def test_the_js_package_ships_the_runtimes_manifest_schema():
    shipped = REPO / "export/src/jaxmint_runtime/manifest.schema.json"
    assert json.loads((JS / "manifest.schema.json").read_text()) == json.loads(shipped.read_text())


def test_the_golden_onnx_artifact_keeps_its_outputs_in_python():
    expected = json.loads((GOLDEN.parent / "digits_onnx_v2.expected.json").read_text())
    predictor = jaxmint_runtime.load(GOLDEN, backend="onnx")
    assert predictor.self_check()
    got = predictor.run({"x": np.asarray(expected["x"], np.float32)})["output"]
    np.testing.assert_allclose(got, np.asarray(expected["output"]), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(node_ready() is not None, reason=str(node_ready()))
def test_node_runs_the_onnx_target_as_the_python_runtime_does(tmp_path):
    model, variables, test = train_digits(steps=60)
    artifact = export_model(
        model,
        variables,
        test["x"][:16],
        tmp_path / "artifact",
        name="digits",
        targets=("onnx",),
        labels=[str(d) for d in range(10)],
    )
    predictor = jaxmint_runtime.load(artifact, backend="onnx")
    batches = [test["x"][:1], test["x"][1:9], test["x"][9:41]]
    expected = {
        "batches": [b.tolist() for b in batches],
        "outputs": [predictor.run({"x": b})["output"].tolist() for b in batches],
    }
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    out = subprocess.run(
        ["node", "--test", "--test-concurrency=1", "--test-reporter=tap", "test/"],
        cwd=JS,
        env={**os.environ, "JAXMINT_JS_FRESH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout and "# skipped 0" in out.stdout, out.stdout[-3000:]
    assert "ok 1 - gives the Python runtime's outputs, batch by batch" in out.stdout


@pytest.mark.skipif(node_ready() is not None, reason=str(node_ready()))
def test_the_node_snippet_in_the_deployment_docs_runs(tmp_path):
    page = (REPO / "docs/deployment.md").read_text()
    (snippet,) = [
        code
        for code in re.findall(r"```javascript\n(.*?)```", page, re.S)
        if "jaxmint-runtime-js" in code
    ]
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules/jaxmint-runtime-js").symlink_to(JS)  # as if npm-installed
    shutil.copytree(GOLDEN, tmp_path / "artifacts/digits")
    (tmp_path / "snippet.mjs").write_text(snippet)
    out = subprocess.run(
        ["node", "snippet.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("[ 1, 10 ]"), out.stdout
