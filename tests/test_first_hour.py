"""A new user's first hour, in order, in one fresh copy of the repository.

The README's tour, then every code block of docs/tour.md, then the demo's
prediction step, then an experiment of the user's own in a folder of its own with
a helper module beside it: trained, exported by `jaxmint export` from another
directory, and served. Everything shares one working directory, as it does for a
user, so run dirs that collide or a command that cannot find the user's module
fail here. Any non-zero exit or "Traceback" fails.

Shortened where the pages give full-size commands: experiment scripts run with
`--smoke`, the sweep with two trials, and the README's tour with 200 steps.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_docs import blocks

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_of_the_repository(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


class User:
    """Runs commands the way the pages show them, in one working directory."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.env.pop("PYTHONPATH", None)

    def run(self, command: list[str] | str, *, cwd: Path | None = None, timeout=300) -> str:
        argv = shlex.split(command) if isinstance(command, str) else command
        if argv[0] == "python":
            argv[0] = sys.executable
        out = subprocess.run(
            argv,
            cwd=cwd or self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        shown = " ".join(map(str, argv))
        assert out.returncode == 0, f"{shown} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        assert "Traceback" not in out.stderr, f"{shown}:\n{out.stderr[-4000:]}"
        return out.stdout

    def python(self, code: str, name: str) -> str:
        script = self.cwd / f".{name}.py"
        script.write_text(code)
        return self.run(["python", str(script)])


def _shortened(line: str) -> str | None:
    """A bash line of docs/tour.md as this test runs it (None: not run here)."""
    line = line.split("  #")[0].strip()
    if not line or line.startswith("jaxmint-serve"):  # a server that never returns
        return None  # (the page's python block serves the same artifact and asks it)
    if line.startswith("python experiments/") and "--smoke" not in line:
        return f"{line} --smoke --no-progress"
    if line.startswith("jaxmint sweep ") and "--sweep-dir" in line:
        return f"{line} --trials 2 -- --smoke"
    return line


@pytest.mark.slow
def test_readme_then_tour_then_demo_then_an_experiment_of_ones_own(tmp_path):
    repo = _copy_of_the_repository(tmp_path / "jaxmint")
    user = User(repo)

    # 1. The README's tour.
    readme = (repo / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    user.python(code.replace("steps=1000", "steps=200"), "readme")

    # 2. Every block of docs/tour.md, in the page's order, in one script: python blocks
    # as they are (they share names), each bash line as a command run where it stands.
    page = (repo / "docs/tour.md").read_text()
    script = [SHELL_HELPER]
    for block in blocks(page, "tour.md"):
        if block.language == "python" and block.runs:
            script.append(block.code)
        elif block.language == "bash":
            lines = filter(None, map(_shortened, block.code.splitlines()))
            script += [f"_sh({line!r})\n" for line in lines]
    user.python("".join(script), "tour")

    # 3. The demo's last step, on the artifact the tour exported. (tests/test_readme.py
    # runs scripts/demo.sh itself, its training and export in full.)
    demo = (repo / "scripts/demo.sh").read_text()
    assert '.venv/bin/python scripts/predict_digits.py "$artifact"' in demo
    out = user.run("python scripts/predict_digits.py artifacts/digits_smoke")
    assert "correct" in out

    # 4. An experiment of one's own, in its own folder, importing a module beside it;
    # `jaxmint export` runs from another directory and still finds the helper.
    own = tmp_path / "my_project"
    own.mkdir()
    (own / "my_layers.py").write_text(WIDTHS_HELPER)
    (own / "my_exp.py").write_text(textwrap.dedent(OWN_EXPERIMENT))
    user.run(["python", "my_exp.py", "--workdir", "runs/mine", "--no-progress"], cwd=own)
    user.run(["jaxmint", "export", str(own / "runs/mine"), "--out", str(own / "art")])
    user.run(["jaxmint", "inspect-step", str(own / "runs/mine")])
    _serve_once(own / "art")


def _serve_once(artifact: Path) -> None:
    from jaxmint_runtime.serve import Server

    with Server([str(artifact)], port=0).start() as server:
        x = np.zeros((2, 64), np.float32)
        body = {
            "inputs": [
                {"name": "x", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
        request = urllib.request.Request(
            f"{server.url}/v2/models/my_exp/infer",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    assert answer["outputs"][0]["shape"] == [2, 10]


SHELL_HELPER = """
import os as _os
import shlex as _shlex
import subprocess as _subprocess
import sys as _sys


def _sh(command):
    argv = _shlex.split(command)
    if argv[0] == "python":
        argv[0] = _sys.executable
    out = _subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, (command, out.stderr[-4000:])

"""

WIDTHS_HELPER = '''
"""A helper module beside the experiment script."""

WIDTHS = (32,)
'''

OWN_EXPERIMENT = """
import dataclasses

import optax

import jaxmint
from jaxmint.config import field
from jaxmint.experiment import Common, Experiment
from my_layers import WIDTHS  # a module beside this script


@dataclasses.dataclass
class Config(Common):
    \"\"\"My first experiment.\"\"\"

    steps: int = field(30, "optimizer steps")
    batch_size: int = field(64, "batch size")
    eval_every: int = field(30, "evaluate every N steps")
    checkpoint_every: int = field(30, "checkpoint every N steps")


def build(config):
    train, test = jaxmint.data.digits(seed=config.seed)
    model = jaxmint.models.mlp(WIDTHS, num_outputs=10)
    loss = jaxmint.losses.softmax_cross_entropy()
    return Experiment(model, loss, optax.adam(config.lr), train, eval=test)


if __name__ == "__main__":
    jaxmint.experiment.main(build, Config)
"""
