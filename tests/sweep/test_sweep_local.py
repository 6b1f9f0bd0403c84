"""End to end through the CLI: two local workers via submitit, pruning, a killed worker."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CLI, trial_past_its_first_checkpoint

from jaxmint.sweep import open_study
from jaxmint.sweep._study import REQUEUED, read_state, slot_of
from jaxmint.sweep._worker import load_sweep

SPACE = '{"quality": Uniform(0.0, 1.0)}'


def _study(sweep_dir):
    state = read_state(sweep_dir)
    _, spec = load_sweep(state["experiment"])
    return open_study(sweep_dir, spec, state.get("storage"))


@pytest.mark.slow
def test_two_local_workers_prune_and_report(tiny, cli, tmp_path):
    # Seed 28: each worker's second draw is below both first draws, so the median pruner
    # (one completed trial is enough) must stop at least two trials at their first report.
    script = tiny(SPACE, trials=8, seed=28, pruner_options={"n_startup_trials": 1})
    sweep_dir = tmp_path / "sweep"
    out = cli(
        "sweep",
        script,
        "--sweep-dir",
        sweep_dir,
        "--workers",
        "2",
        "--timeout-min",
        "3",
        "--",
        "--steps",
        "15",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = _study(sweep_dir)
    trials = study.get_trials()
    assert len(trials) == 8
    states = [t.state.name for t in trials]
    assert states.count("PRUNED") >= 2, states
    assert set(states) <= {"COMPLETE", "PRUNED"}
    for t in trials:  # every trial is a full run dir, with the -- overrides applied
        run = sweep_dir / "trials" / str(slot_of(t))
        config = json.loads((run / "config.json").read_text())
        assert config["config"]["steps"] == 15
        assert config["config"]["quality"] == pytest.approx(t.params["quality"])
        assert (run / "metrics.jsonl").exists()
        if t.state.name == "COMPLETE":
            assert t.value == pytest.approx(t.params["quality"], rel=1e-5)
            assert (run / "checkpoints" / "15").exists()
    # the report printed by the command: one row per trial, best first
    assert "eval/score" in out.stdout and out.stdout.count("PRUNED") >= 2
    assert (sweep_dir / "trials.csv").read_text().count("\n") == 9


@pytest.mark.slow
def test_killed_worker_trial_is_requeued_and_resumed(tiny, tmp_path):
    script = tiny(SPACE, trials=4, pruner="none")
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI,
            "sweep",
            str(script),
            "--sweep-dir",
            str(sweep_dir),
            "--workers",
            "2",
            "--timeout-min",
            "3",
            "--heartbeat-s",
            "0.5",
            "--stale-after-s",
            "3",
            "--",
            "--steps",
            "40",
            "--delay",
            "0.05",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        victim = trial_past_its_first_checkpoint(sweep_dir, proc, timeout_s=60)
        assert victim is not None, "no trial reached its first checkpoint in 60 s"
        os.kill(victim[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, stderr[-3000:]
    assert "killed by SIGKILL" in stderr  # the worker's job reports its death
    trials = _study(sweep_dir).get_trials()
    killed = trials[victim[0]]
    assert killed.state.name == "FAIL" and killed.user_attrs[REQUEUED]
    counted = [t for t in trials if not t.user_attrs.get(REQUEUED)]
    # every slot of the budget is accounted for exactly once, and finished
    assert sorted(slot_of(t) for t in counted) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in counted)
    rerun = next(t for t in counted if slot_of(t) == victim[0])
    assert rerun.number != victim[0] and rerun.params == killed.params
    assert rerun.user_attrs["attempt"] == 2
    assert rerun.user_attrs["resumed_from_step"] >= 10  # from the killed attempt's checkpoint


@pytest.mark.slow
def test_sigterm_checkpoints_and_requeues_the_trial(tiny, tmp_path):
    """Preemption: SIGTERM makes fit save, the worker re-enqueues its trial and exits 143."""
    from jaxmint import sweep

    script = tiny(SPACE, trials=1, pruner="none")
    sweep_dir = tmp_path / "sweep"
    sweep.prepare(
        script, sweep_dir, ["--steps", "40", "--delay", "0.05"], heartbeat_s=0.5, stale_after_s=3
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxmint.sweep.worker", "--sweep-dir", str(sweep_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        ckpt = sweep_dir / "trials" / "0" / "checkpoints" / "10"
        while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert ckpt.exists(), "the trial reached no checkpoint in 60 s"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 143, stderr[-2000:]
    trials = _study(sweep_dir).get_trials()
    assert trials[0].state.name == "FAIL" and "preempted" in trials[0].user_attrs[REQUEUED]
    assert trials[1].state.name == "WAITING" and trials[1].user_attrs["slot"] == 0
    sweep.run_worker(sweep_dir, max_wait_s=30)  # the requeued task's worker
    trials = _study(sweep_dir).get_trials()
    assert trials[1].state.name == "COMPLETE" and trials[1].user_attrs["resumed_from_step"] > 10
