"""Sweeps on a real Ray cluster: a head and a second node started with `ray start`,
four workers as Ray tasks, one killed mid-trial."""

import os
import signal
import subprocess
import sys
import time

import pytest
from _ray import RayCluster, why_not
from conftest import CLI, trial_past_its_first_checkpoint

from jaxmint.sweep import open_study
from jaxmint.sweep._study import REQUEUED, read_state, slot_of
from jaxmint.sweep._worker import load_sweep

pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))

SPACE = '{"quality": Uniform(0.0, 1.0)}'


@pytest.fixture
def cluster():
    started = RayCluster(nodes=2, cpus_per_node=2)
    yield started
    started.close()


def _study(sweep_dir):
    state = read_state(sweep_dir)
    _, spec = load_sweep(state["experiment"])
    return open_study(sweep_dir, spec, state.get("storage"))


@pytest.mark.slow
def test_four_ray_tasks_finish_the_study_when_one_worker_is_killed(tiny, cluster, tmp_path):
    script = tiny(SPACE, trials=4, pruner="none")
    sweep_dir = tmp_path / "sweep"
    argv = [sys.executable, "-c", CLI, "sweep", str(script), "--sweep-dir", str(sweep_dir)]
    argv += ["--executor", "ray", "--workers", "4", "--timeout-min", "4"]
    argv += ["--heartbeat-s", "0.5", "--stale-after-s", "4", "--", "--steps", "40"]
    argv += ["--delay", "0.05"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        victim = trial_past_its_first_checkpoint(sweep_dir, proc, timeout_s=120)
        assert victim is not None, "no trial reached its first checkpoint in 120 s"
        os.kill(victim[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, stderr[-3000:]
    assert "(ray)" in stdout and "killed by SIGKILL" in stderr  # that worker's task failed
    trials = _study(sweep_dir).get_trials()
    killed = trials[victim[0]]
    assert killed.state.name == "FAIL" and killed.user_attrs[REQUEUED]  # marked failed once
    counted = [t for t in trials if not t.user_attrs.get(REQUEUED)]
    assert sorted(slot_of(t) for t in counted) == [0, 1, 2, 3]  # never run twice to completion
    assert all(t.state.name == "COMPLETE" for t in counted)
    rerun = next(t for t in counted if slot_of(t) == victim[0])
    assert rerun.params == killed.params and rerun.user_attrs["resumed_from_step"] >= 10
    print(f"ray sweep: {len(trials)} trials in {time.monotonic() - started:.0f} s")
