"""The demo page (examples/browser) in headless Chromium, driven by playwright-core.

The page loads the golden ONNX artifact through jaxmint-runtime-js and
onnxruntime-web; one test digit of each class is drawn on its canvas as pixels,
and the prediction the page shows must be the Python runtime's for the input the
page read off its canvas. A tampered artifact must be refused in the page. The
screenshot is kept in ``$JAXMINT_TEST_OUTPUT`` (default ``runs/test-output``).
"""

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import jaxmint
import jaxmint_runtime

REPO = Path(__file__).resolve().parents[2]
JS = REPO / "export/js"
GOLDEN = REPO / "tests/golden/digits_onnx_v2"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _why_not() -> str | None:
    if CHROMIUM is None:
        return "chromium is not installed (bash scripts/setup.sh installs Debian's as root)"
    if shutil.which("node") is None or not (JS / "node_modules/playwright-core").is_dir():
        return "export/js has no node_modules: bash scripts/setup.sh runs npm ci there"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def _serve():
    spec = importlib.util.spec_from_file_location("demo_serve", REPO / "examples/browser/serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.serve_in_thread


def _drive(url: str, digits: list, tmp_path: Path, screenshot: Path | None = None) -> dict:
    if not (JS / "dist/browser.js").exists():
        subprocess.run(["npm", "run", "--silent", "build"], cwd=JS, check=True, timeout=120)
    (tmp_path / "digits.json").write_text(json.dumps(digits))
    argv = ["node", "scripts/browser-check.mjs", "--url", url, "--chromium", CHROMIUM]
    argv += ["--digits", str(tmp_path / "digits.json"), "--calls", "50"]
    if screenshot is not None:
        argv += ["--screenshot", str(screenshot)]
    out = subprocess.run(argv, cwd=JS, capture_output=True, text=True, timeout=180)
    assert out.stdout.strip(), out.stderr[-3000:]
    return {"returncode": out.returncode, **json.loads(out.stdout.strip().splitlines()[-1])}


def test_a_drawn_digit_is_predicted_in_the_page_as_in_python(tmp_path):
    _, test = jaxmint.data.digits()
    picks = [int(np.flatnonzero(test["y"] == d)[0]) for d in range(10)]  # one of each class
    digits = test["x"][picks]
    output_dir = Path(os.environ.get("JAXMINT_TEST_OUTPUT", REPO / "runs/test-output"))
    output_dir.mkdir(parents=True, exist_ok=True)
    screenshot = output_dir / "browser_demo.png"
    server, url = _serve()(GOLDEN)
    try:
        report = _drive(url, digits.tolist(), tmp_path, screenshot)
    finally:
        server.shutdown()
        server.server_close()
    assert report["returncode"] == 0 and report["state"] == "ready", report
    assert "sha256 checked, the check sample passed" in report["status"]
    assert not [line for line in report["console"] if line.startswith(("error", "pageerror"))]
    python = jaxmint_runtime.load(GOLDEN, backend="onnx")
    for pixels, result in zip(digits, report["results"], strict=True):
        seen = np.asarray(result["input"], np.float32)  # what the page read off its canvas
        np.testing.assert_allclose(seen, pixels, atol=1 / 255 + 1e-6)  # 8-bit canvas levels
        want = python.run({"x": seen[None]})["output"][0]
        np.testing.assert_allclose(result["logits"], want, rtol=1e-4, atol=1e-4)
        assert result["index"] == int(np.argmax(want))
        assert result["shown"] == python.labels["output"][result["index"]]
    correct = sum(r["index"] == d for d, r in enumerate(report["results"]))
    assert correct >= 8, [r["index"] for r in report["results"]]
    assert screenshot.stat().st_size > 10_000
    assert report["batch1MeanMs"] > 0 and report["loadMs"] > 0


def test_the_page_refuses_a_tampered_artifact(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(GOLDEN, bad)
    data = bad / "onnx/model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0xFF
    data.write_bytes(bytes(raw))
    server, url = _serve()(bad)
    try:
        report = _drive(url, [[0.0] * 64], tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert report["returncode"] == 1 and report["state"] == "error", report
    assert "model.onnx.data: sha256 does not match the manifest" in report["error"]
