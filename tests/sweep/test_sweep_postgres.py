"""Sweeps on a real PostgreSQL study store: four pull workers, one killed mid-trial,
the server restarted mid-sweep, and the sweep continued after another restart."""

import os
import signal
import subprocess
import sys

import pytest
from _postgres import Postgres, why_not
from conftest import CLI, trial_past_its_first_checkpoint

from jaxmint.sweep import open_study
from jaxmint.sweep._study import REQUEUED, read_state, slot_of
from jaxmint.sweep._worker import load_sweep

pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))

SPACE = '{"quality": Uniform(0.0, 1.0)}'


@pytest.fixture
def postgres():
    server = Postgres()
    yield server
    server.close()


def _study(sweep_dir):
    state = read_state(sweep_dir)
    _, spec = load_sweep(state["experiment"])
    return open_study(sweep_dir, spec, state.get("storage"))


def _sweep(script, sweep_dir, url, trials, workers=4, **env_vars):
    argv = [sys.executable, "-c", CLI, "sweep", str(script), "--sweep-dir", str(sweep_dir)]
    argv += ["--storage", url, "--workers", str(workers), "--trials", str(trials)]
    argv += ["--timeout-min", "4"]
    argv += ["--heartbeat-s", "0.5", "--stale-after-s", "4", "--", "--steps", "40"]
    argv += ["--delay", "0.05"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **env_vars}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.slow
def test_four_workers_a_kill_and_two_restarts_account_for_every_trial_once(
    tiny, postgres, tmp_path
):
    script = tiny(SPACE, trials=4, pruner="none")
    sweep_dir = tmp_path / "sweep"
    proc = _sweep(script, sweep_dir, postgres.url, trials=4)
    try:
        victim = trial_past_its_first_checkpoint(sweep_dir, proc)
        assert victim is not None, "no trial reached its first checkpoint in 90 s"
        os.kill(victim[1], signal.SIGKILL)
        postgres.restart(down_s=1.0)  # the store goes away under the running workers
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, stderr[-3000:]
    trials = _study(sweep_dir).get_trials()
    killed = trials[victim[0]]
    assert killed.state.name == "FAIL" and killed.user_attrs[REQUEUED], stderr[-6000:]
    counted = [t for t in trials if not t.user_attrs.get(REQUEUED)]
    assert sorted(slot_of(t) for t in counted) == [0, 1, 2, 3]  # each slot once
    assert all(t.state.name == "COMPLETE" for t in counted)
    rerun = next(t for t in counted if slot_of(t) == victim[0])
    assert rerun.params == killed.params and rerun.user_attrs["resumed_from_step"] >= 10
    logs = "".join(f.read_text() for f in (sweep_dir / "submitit").rglob("*_log.err"))
    assert "study storage unreachable" in logs  # the workers waited the restart out

    # The study lives in the server, not the workers: restart it, then continue the sweep.
    postgres.restart()
    proc = _sweep(script, sweep_dir, postgres.url, trials=6, workers=2)  # two trials more
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    counted = [t for t in _study(sweep_dir).get_trials() if not t.user_attrs.get(REQUEUED)]
    assert sorted(slot_of(t) for t in counted) == [0, 1, 2, 3, 4, 5]
    assert all(t.state.name == "COMPLETE" for t in counted)


def test_a_store_that_cannot_be_reached_is_named_before_any_worker_starts(
    tiny, postgres, tmp_path, cli
):
    script = tiny(SPACE, trials=2, pruner="none")
    postgres.stop()
    url = postgres.url.replace("jaxmint@", "jaxmint:s3cret@")
    out = cli("sweep", script, "--sweep-dir", tmp_path / "s", "--storage", url, "--workers", "1")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot reach the study storage" in out.stderr and "Traceback" not in out.stderr
    assert "s3cret" not in out.stderr and "***" in out.stderr  # the password is not printed
    postgres.start()


@pytest.mark.slow
def test_a_store_gone_for_longer_than_the_workers_wait_fails_loudly_then_continues(
    tiny, postgres, tmp_path
):
    script = tiny(SPACE, trials=4, pruner="none")
    sweep_dir = tmp_path / "sweep"
    patience = {"JAXMINT_SWEEP_STORAGE_PATIENCE_S": "2"}
    # Two workers: what is tested is how a worker gives up and how the sweep says so.
    proc = _sweep(script, sweep_dir, postgres.url, trials=4, workers=2, **patience)
    try:
        assert trial_past_its_first_checkpoint(sweep_dir, proc) is not None
        postgres.stop()  # and it stays down past the workers' patience
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        postgres.start()
    assert proc.returncode == 1, stderr[-3000:]
    assert "cannot reach the study storage" in stderr and "run the same command again" in stderr
    proc = _sweep(script, sweep_dir, postgres.url, trials=4, workers=2)  # the same, once more
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    counted = [t for t in _study(sweep_dir).get_trials() if not t.user_attrs.get(REQUEUED)]
    assert sorted(slot_of(t) for t in counted) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in counted)
