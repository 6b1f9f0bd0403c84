"""The documentation site builds with warnings as errors, and docs/cli.md is fresh.

``mkdocs build --strict`` fails on a broken link or anchor, a page missing from the
nav, or a docstring mkdocstrings cannot render; the build also trains the small runs
whose plots are the site's figures (docs/_hooks/figures.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path):
    site = tmp_path / "site"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stderr[-6000:]}"
    for page in ("index", "tour", "concepts", "cli", "comparison", "api"):
        assert (site / f"{page}.html").is_file(), f"{page}.html was not built"
    api = (site / "api.html").read_text(encoding="utf-8")
    for name in ("jaxmint.train.fit", "jaxmint.losses.term", "jaxmint_runtime.load"):
        assert f'id="{name}"' in api, f"api.html documents no {name}"
    for run in ("tour", "stuck"):
        for plot in ("losses", "grad_share", "update_ratio"):
            png = site / "figures" / run / f"{plot}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    assert "fonts.googleapis.com" not in (site / "index.html").read_text(encoding="utf-8")


def _gen_cli_docs():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "scripts/gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cli_reference_is_fresh():
    gen = _gen_cli_docs()
    page = gen.PAGE.read_text(encoding="utf-8")
    recorded = re.search(r"with Python (\d+\.\d+)", page)
    if recorded is None or recorded[1] != gen.python_version():
        pytest.skip("docs/cli.md was generated with another Python; argparse's layout differs")
    assert page == gen.render(), "docs/cli.md is stale: run python scripts/gen_cli_docs.py"
