"""--summary and --debug on a shipped experiment, and `jaxmint inspect-step RUN_DIR`."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxmint.cli import main as cli
from jaxmint.debug import rerun_command

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "digits_mlp.py"


def run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_summary_flag_prints_the_table_and_trains_nothing(tmp_path):
    out = run("--summary", "--hidden", "32", "--workdir", tmp_path / "run")
    assert "dense0" in out.stdout and "head" in out.stdout
    assert f"{64 * 32 + 32 + 32 * 10 + 10:,}" in out.stdout  # the total parameter count
    assert "FLOPs per example" in out.stdout
    assert not (tmp_path / "run").exists()


def test_debug_smoke_run_then_inspect_step(tmp_path, capsys):
    workdir = tmp_path / "run"
    run("--smoke", "--debug", "--steps", "3", "--no-progress", "--workdir", workdir)
    assert (workdir / "DEBUG_RUN").exists()
    assert json.loads((workdir / "config.json").read_text())["debug"] is True

    assert cli(["inspect-step", str(workdir)]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint at step 3, the batch of step 4" in printed
    for text in ("ce", "l2", "total", "|update|", "|grad| dense0", "act0"):
        assert text in printed

    assert cli(["inspect-step", str(tmp_path / "nothing")]) == 2
    assert "not a run dir" in capsys.readouterr().err


def test_inspect_step_shows_the_update_the_run_applied_next(tmp_path):
    import jax

    from jaxmint.debug import inspect_run
    from jaxmint.run import load_params

    workdir = tmp_path / "run"  # warmup from a learning rate of 0, then Adam's moments
    run("--smoke", "--steps", "5", "--checkpoint-every", "1", "--no-progress", "--workdir", workdir)
    report, step = inspect_run(workdir, 4)
    assert step == 4
    before, after = (load_params(workdir, s)[0]["params"] for s in (4, 5))
    applied = jax.tree_util.tree_map(lambda a, b: b - a, before, after)
    jax.tree_util.tree_map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7),
        report.update,
        applied,
    )
    assert not any(f.code == "update-ratio-low" for f in report.flags)


def test_rerun_command_replays_the_step_with_the_same_steps():
    command = rerun_command(
        ["python experiments/x.py", "--check", "--lr", "1", "--steps", "900", "--workdir", "r/a"],
        17,
        "r/a",
    )
    assert command == (
        "python experiments/x.py --lr 1 --steps 900 --debug --fresh --replay-from r/a "
        "--stop-after 17 --workdir r/a-replay"
    )


def test_check_flag_stops_and_prints_the_debug_command(tmp_path, toy):
    import dataclasses

    import jax.numpy as jnp
    import optax
    import pytest

    import jaxmint
    from jaxmint import losses
    from jaxmint.experiment import Common, Experiment

    @dataclasses.dataclass
    class Config(Common):
        """A planted out-of-bounds index."""

    def build(config):
        bad = losses.term(lambda out, b: out[jnp.arange(out.shape[0]), b["y"] + 3], name="bad")
        return Experiment(
            jaxmint.models.mlp([4], num_outputs=3), bad, optax.sgd(0.1), toy, eval=None
        )

    workdir = str(tmp_path / "run")
    argv = ["--check", "--steps", "3", "--batch-size", "8", "--workdir", workdir, "--no-progress"]
    with pytest.raises(SystemExit) as e:
        jaxmint.experiment.main(build, Config, argv)
    message = str(e.value.code)
    assert "checked step 1 failed: out-of-bounds" in message
    assert (
        f"--steps 3 --batch-size 8 --no-progress --debug --fresh --replay-from {workdir} "
        f"--stop-after 1 --workdir {workdir}-replay"
    ) in message


def test_the_printed_replay_fails_at_the_same_step_from_a_checkpoint(tmp_path, toy, capsys, caplog):
    """The replay resumes from the checkpoint before the failure, keeps --steps (so a
    warmup-cosine schedule is the same) and stops at the failing step, un-jitted."""
    import dataclasses

    import jax.numpy as jnp
    import optax
    import pytest

    import jaxmint
    from jaxmint import losses
    from jaxmint.experiment import Common, Experiment

    @dataclasses.dataclass
    class Config(Common):
        """A log of a negative number, planted in one example."""

    data = {**toy, "w": np.ones(len(toy["y"]), np.float32)}
    data["w"][40] = -1.0

    def build(config):
        bad = losses.term(lambda out, b: -jnp.log(b["w"] + 0 * out.sum(-1)), name="bad")
        schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, config.steps)
        loss = losses.softmax_cross_entropy() + 1e-3 * bad
        return Experiment(
            jaxmint.models.mlp([4], num_outputs=3), loss, optax.sgd(schedule), data, eval=None
        )

    workdir = str(tmp_path / "run")
    argv = ["--check", "--steps", "40", "--batch-size", "8", "--checkpoint-every", "2"]
    argv += ["--workdir", workdir, "--no-progress"]
    with pytest.raises(SystemExit) as e:
        jaxmint.experiment.main(build, Config, argv)
    message = str(e.value.code)
    failed = int(message.split("checked step ")[1].split()[0])
    assert failed > 2, message  # so that there is a checkpoint before it
    command = message.splitlines()[-1].split()
    assert command[command.index("--steps") + 1] == "40"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, caplog.at_level(logging.WARNING, logger="jaxmint"):
        jaxmint.experiment.main(build, Config, command[2:])
    assert f"non-finite values at step {failed}" in str(e.value.code)
    before = max(k for k in range(2, failed, 2))
    assert f"from its checkpoint at step {before} to step {failed}" in capsys.readouterr().out
    assert "changed config" not in caplog.text
    replay = jaxmint.run.RunDir(f"{workdir}-replay")
    assert replay.read_config()["fit"]["steps"] == 40 and replay.recorded_debug()
