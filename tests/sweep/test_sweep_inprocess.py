"""Workers run in this process: failures, continuing a study, the report, specs, SLURM."""

import csv
import json
import os
import pickle
import re
import stat

import pytest

from jaxmint import sweep
from jaxmint.sweep import Categorical, Grid, LogUniform, Spec, SweepError, Uniform
from jaxmint.sweep._study import read_state


def _study(sweep_dir):
    state = read_state(sweep_dir)
    from jaxmint.sweep._worker import load_sweep

    return sweep.open_study(sweep_dir, load_sweep(state["experiment"])[1])


def test_failed_trial_keeps_traceback_and_sweep_goes_on_then_continues(tiny, tmp_path):
    script = tiny(
        '{"mode": Grid(["ok", "boom", "ok2"])}', trials=None, sampler="grid", pruner="none"
    )
    sweep_dir = tmp_path / "sweep"
    # "ok2" is no valid mode for build, but build only raises on "boom": it trains.
    sweep.prepare(script, sweep_dir, ["--smoke"], trials=2)
    done = sweep.run_worker(sweep_dir, max_wait_s=30)
    assert sum(done.values()) == 2
    # continue the same study with a larger budget: the old trials are kept
    sweep.prepare(script, sweep_dir, ["--smoke"], trials=3)
    done = sweep.run_worker(sweep_dir, max_wait_s=30)
    assert sum(done.values()) == 1
    trials = _study(sweep_dir).get_trials()
    assert len(trials) == 3
    assert sorted(t.params["mode"] for t in trials) == ["boom", "ok", "ok2"]
    (boom,) = [t for t in trials if t.params["mode"] == "boom"]
    assert boom.state.name == "FAIL" and "boom" in boom.user_attrs["error"]
    text = (sweep_dir / "trials" / str(boom.user_attrs["slot"]) / "traceback.txt").read_text()
    assert "Traceback" in text and "RuntimeError: boom" in text
    assert all(t.state.name == "COMPLETE" for t in trials if t is not boom)
    # a trial's run dir records the experiment script, so it exports like any run
    (ok,) = [t for t in trials if t.params["mode"] == "ok"]
    run_dir = sweep_dir / "trials" / str(ok.user_attrs["slot"])
    assert json.loads((run_dir / "config.json").read_text())["config"]["experiment"] == str(
        script.resolve()
    )
    from jaxmint.export import export_run

    assert (export_run(run_dir, tmp_path / "art", batch_sizes=(1,)) / "manifest.json").exists()
    # a third run with the budget spent does nothing
    assert sum(sweep.run_worker(sweep_dir, max_wait_s=30).values()) == 0

    found = sweep.report(sweep_dir)
    states = [r["state"] for r in found["rows"]]
    assert sorted(states) == ["COMPLETE", "COMPLETE", "FAIL"] and states[-1] == "FAIL"
    for name in ("trials.csv", "objective.png", "params.png", "curves.png"):
        assert (sweep_dir / name).stat().st_size > 0
    with open(sweep_dir / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == [str(r["trial"]) for r in found["rows"]]
    assert {"state", "value", "params/mode"} <= set(table[0])


def test_sweep_report_command(tiny, cli, tmp_path):
    script = tiny(
        '{"quality": Uniform(0, 1), "width": Int(2, 8), "lr": LogUniform(1e-3, 1e-1)}',
        trials=3,
        pruner="none",
    )
    sweep_dir = tmp_path / "sweep"
    sweep.prepare(script, sweep_dir, ["--smoke"])
    sweep.run_worker(sweep_dir, max_wait_s=30)
    out = cli("sweep-report", sweep_dir, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if "COMPLETE" in x and "maximize" not in x]
    assert len(lines) == 3
    values = [float(re.split(r"[│|]", line)[3]) for line in lines]
    assert values == sorted(values, reverse=True)  # maximize: best first
    assert "trials.csv" in out.stdout and (sweep_dir / "curves.png").exists()
    out = cli("sweep-report", tmp_path / "nothing", timeout=60)
    assert out.returncode == 2 and "not a sweep dir" in out.stderr


def test_prepare_checks_before_anything_runs(tiny, tmp_path):
    bad = tiny('{"nope": Uniform(0, 1)}', name="bad.py")
    with pytest.raises(SweepError, match="nope"):
        sweep.prepare(bad, tmp_path / "a")
    good = tiny('{"quality": Uniform(0, 1)}')
    with pytest.raises(SweepError, match="overrides"):
        sweep.prepare(good, tmp_path / "b", ["--no-such-flag", "1"])
    sweep.prepare(good, tmp_path / "c", ["--smoke"])
    with pytest.raises(SweepError, match="different overrides"):
        sweep.prepare(good, tmp_path / "c", ["--steps", "3"])
    with pytest.raises(SweepError, match="heartbeat"):
        sweep.prepare(good, tmp_path / "d", heartbeat_s=10, stale_after_s=5)


def test_spec_validation_and_grid():
    with pytest.raises(SweepError, match="continuous"):
        Spec({"lr": LogUniform(1e-3, 1e-1)}, sampler="grid", trials=None)
    with pytest.raises(SweepError, match="not > 0"):
        Spec({"lr": LogUniform(0, 1)})
    with pytest.raises(SweepError, match="direction"):
        Spec({"lr": Uniform(0, 1)}, direction="up")
    spec = Spec(
        {"hidden": Grid([(64,), (32, 32)]), "wd": Categorical([0.0, 1e-4])},
        sampler="grid",
        trials=None,
    )
    assert spec.budget == 4
    assert spec.grid()["hidden"] == ["json:[64]", "json:[32, 32]"]


def test_config_gets_tuples_back():
    import dataclasses

    from jaxmint.config import field
    from jaxmint.experiment import Common
    from jaxmint.sweep._space import apply

    @dataclasses.dataclass
    class C(Common):
        hidden: tuple[int, ...] = field((8,), "widths")

    config = apply(C(), {"hidden": "json:[32, 16]", "lr": 0.5}, workdir="w")
    assert config.hidden == (32, 16) and config.lr == 0.5 and config.workdir == "w"


def test_worker_env_pins_one_device_each(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert sweep.worker_env(0, 2, []) == {}
    assert sweep.worker_env(1, 2, ["0", "1"]) == {"CUDA_VISIBLE_DEVICES": "1"}
    shared = sweep.worker_env(3, 4, ["0", "1"])  # two workers per device: memory split
    assert shared == {"CUDA_VISIBLE_DEVICES": "1", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert sweep.visible_devices() == ["2", "3"]


def test_slurm_job_array_submission(tiny, tmp_path, monkeypatch):
    """No SLURM here: a fake sbatch records the script submitit generates."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    srun = bin_dir / "srun"  # submitit checks that srun exists; it is never called here
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script = tiny('{"quality": Uniform(0, 1)}')
    sweep_dir = tmp_path / "sweep"
    sweep.prepare(script, sweep_dir, ["--smoke"])
    jobs = sweep.launch_slurm(sweep_dir, 4, timeout_min=120, partition="gpu", gpus_per_task=1)
    assert [j.job_id for j in jobs] == [f"4242_{i}" for i in range(4)]
    text = (tmp_path / "submitted.sh").read_text()
    for line in (
        "#SBATCH --array=0-3%4",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=120",
        "#SBATCH --ntasks-per-node=1",
    ):
        assert line in text, text
    assert "submitit.core._submit" in text
    # each array task runs a checkpointable WorkerJob: on preemption it is resubmitted
    pickles = sorted((sweep_dir / "submitit").rglob("*_submitted.pkl"))
    assert len(pickles) == 4
    with open(pickles[0], "rb") as f:
        job = pickle.load(f).function
    assert isinstance(job, sweep.WorkerJob) and job.sweep_dir == str(sweep_dir.resolve())
    again = job.checkpoint()
    assert isinstance(again.function, sweep.WorkerJob) and again.function.index == job.index


def test_ray_missing_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(SweepError, match=r"pip install 'jaxmint\[ray\]'"):
        sweep.launch_ray(tmp_path, 2)
