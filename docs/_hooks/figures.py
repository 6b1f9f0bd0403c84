"""MkDocs hook: draw the docs' figures from real runs on the embedded digits data.

At build time a subprocess (a fresh interpreter, CPU only) trains two small runs and
writes their diagnosis plots to a temporary folder; the PNGs are added to the site as
generated files under ``figures/``, so pages link to them like any image and nothing
is written into the repository. ``mkdocs serve`` draws them once per process.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.figures")

# Both runs together take about 15 s on 2 CPU cores.
_SCRIPT = r"""
import sys
import optax
import jaxmint
from jaxmint import losses
from jaxmint.diagnose import diagnose_run

out = sys.argv[1]
train, test = jaxmint.data.digits()

# The tour's run: three named terms, each logged as loss/<name>, diagnosed every 10 steps.
jaxmint.fit(
    jaxmint.models.mlp((64,), 10),
    losses.softmax_cross_entropy(label_smoothing=0.05)
    + 1e-3 * losses.z_loss()
    + 1e-4 * losses.l2(),
    optax.adam(3e-3),
    train,
    steps=300,
    batch_size=64,
    eval_data=test,
    eval_every=50,
    log_every=10,
    diagnose_every=10,
    workdir=f"{out}/tour",
    progress=False,
)
diagnose_run(f"{out}/tour")

# diagnosis.md's provoked case: an L2 weight far too high, a learning rate far too low.
jaxmint.fit(
    jaxmint.models.mlp((32,), 10),
    losses.softmax_cross_entropy() + 5.0 * losses.l2(),
    optax.adam(1e-6),
    train,
    steps=60,
    batch_size=64,
    eval_data=test,
    eval_every=20,
    log_every=5,
    diagnose_every=5,
    workdir=f"{out}/stuck",
    progress=False,
)
diagnose_run(f"{out}/stuck")
"""

_drawn: Path | None = None  # the folder of PNGs, drawn once per process


def _draw() -> Path:
    global _drawn
    if _drawn is None:
        out = Path(tempfile.mkdtemp(prefix="jaxmint-docs-figures-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        t0 = time.perf_counter()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"drawing the docs' figures failed:\n{done.stderr[-4000:]}")
        log.info(f"figures drawn from real runs in {time.perf_counter() - t0:.1f}s")
        _drawn = out
    return _drawn


def on_files(files, config):
    """Add ``figures/<run>/<plot>.png`` for each run's diagnosis plots."""
    out = _draw()
    for png in sorted(out.glob("*/diagnosis/*.png")):
        run = png.parent.parent.name
        files.append(File.generated(config, f"figures/{run}/{png.name}", abs_src_path=str(png)))
    return files
