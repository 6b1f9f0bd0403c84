"""The README's promises: its tour runs, and its first command trains the default experiment."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert [b.strip() for b in bash_blocks[:2]] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (REPO / ".ci/run").read_text()


# The README's tour runs in tests/test_first_hour.py, followed by the tour page and the
# demo's steps in the same folder.


@pytest.mark.slow
def test_first_command_trains_default_experiment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAXMINT_ARTIFACT"] = str(tmp_path / "artifact")
    out = subprocess.run(
        ["bash", "scripts/demo.sh", "--workdir", str(tmp_path / "run"), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"run dir: {tmp_path / 'run'}" in out.stdout
    accuracy = float(re.search(r"eval/accuracy\s+([0-9.]+)", out.stdout).group(1))
    assert accuracy >= 0.97
    assert f"exported digits_mlp (step 2000) to {tmp_path / 'artifact'}" in out.stdout
    correct, shown = map(int, re.search(r"(\d+)/(\d+) correct", out.stdout).groups())
    assert shown == 12 and correct >= 11
