"""Launching sweep workers: one process per accelerator, through submitit or Ray.

Each worker is a ``python -m jaxmint.sweep.worker`` process whose environment pins it
to one accelerator *before* jax is imported (``CUDA_VISIBLE_DEVICES``) and, when
several workers share one device, caps each one's memory
(``XLA_PYTHON_CLIENT_MEM_FRACTION``). submitit runs that process on this machine
(``local``) or as a SLURM job array (``slurm``); the job is checkpointable, so a
preempted array task saves its trial's checkpoint and is requeued.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jaxmint.sweep import _study
from jaxmint.sweep._space import SweepError
from jaxmint.sweep._worker import base_config, load_sweep

EXECUTORS = ("local", "slurm", "ray")


def visible_devices() -> list[str]:
    """Accelerator ids to pin workers to: ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU")]
    return []


def worker_env(index: int, workers: int, devices: Sequence[str]) -> dict[str, str]:
    """Environment for worker ``index``: its device, and its share of that device's memory."""
    if not devices:
        return {}
    env = {"CUDA_VISIBLE_DEVICES": devices[index % len(devices)]}
    per_device = -(-workers // len(devices))
    if per_device > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / per_device:.2f}"
    return env


def _die_with_parent() -> None:
    # Linux: the worker gets SIGTERM if the job process that started it dies (SIGKILL
    # included), so a cancelled job never leaves an orphan worker holding a device.
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerJob:
    """What submitit runs: one worker process; requeued on preemption (checkpointable).

    On SLURM's preemption/timeout signal submitit calls `checkpoint`: it forwards
    SIGTERM to the worker, whose `fit` saves a checkpoint and whose trial is re-enqueued,
    then asks submitit to requeue this array task.
    """

    def __init__(self, sweep_dir: str, index: int, env: dict[str, str] | None = None):
        self.sweep_dir, self.index, self.env = str(sweep_dir), index, dict(env or {})
        self._proc = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "jaxmint.sweep.worker",
            "--sweep-dir",
            self.sweep_dir,
            "--worker",
            str(self.index),
        ]

    def __call__(self) -> int:
        env = {**os.environ, **self.env}
        self._proc = subprocess.Popen(self.command(), env=env, preexec_fn=_die_with_parent)
        try:
            code = self._proc.wait()
        finally:
            if self._proc.poll() is None:  # interrupted: do not leave the worker behind
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
        if code != 0:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise RuntimeError(
                f"sweep worker {self.index} ({' '.join(self.command())}) ended with {how}; "
                "its running trial is requeued when its heartbeat goes stale"
            )
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)  # fit saves a checkpoint, then exits
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return submitit.helpers.DelayedSubmission(WorkerJob(self.sweep_dir, self.index, self.env))


def _submitit():
    try:
        import submitit
    except ImportError:  # pragma: no cover - submitit is a dependency
        raise SweepError("launching workers needs submitit: pip install 'jaxmint[sweep]'") from None
    return submitit


def launch_local(sweep_dir: Path, workers: int, *, timeout_min: float, devices=None):
    """Start ``workers`` worker jobs on this machine with submitit's LocalExecutor."""
    submitit = _submitit()
    devices = visible_devices() if devices is None else list(devices)
    executor = submitit.LocalExecutor(folder=str(sweep_dir / "submitit" / "%j"))
    # timeout_min: the job is signalled (then killed) after this; signal_delay_s before it.
    executor.update_parameters(timeout_min=timeout_min, signal_delay_s=30)
    jobs = []
    for i in range(workers):
        jobs.append(executor.submit(WorkerJob(str(sweep_dir), i, worker_env(i, workers, devices))))
    return jobs


def slurm_executor(
    sweep_dir: Path,
    workers: int,
    *,
    timeout_min: float,
    partition: str | None = None,
    gpus_per_task: int = 1,
    cpus_per_task: int = 8,
    max_requeues: int = 3,
    extra: dict | None = None,
):
    """A submitit SLURM executor for a job array of ``workers`` one-GPU tasks."""
    submitit = _submitit()
    executor = submitit.SlurmExecutor(
        folder=str(sweep_dir / "submitit" / "%j"), max_num_timeout=max_requeues
    )
    params = dict(
        time=int(timeout_min),
        gpus_per_node=gpus_per_task,
        ntasks_per_node=1,
        cpus_per_task=cpus_per_task,
        array_parallelism=workers,
        signal_delay_s=120,  # SIGUSR2 two minutes before the end: time to checkpoint
        job_name="jaxmint-sweep",
    )
    if partition:
        params["partition"] = partition
    params.update(extra or {})
    executor.update_parameters(**params)
    return executor


def launch_slurm(sweep_dir: Path, workers: int, **kwargs):
    """Submit the workers as one SLURM job array; returns the submitit jobs (not waited on)."""
    executor = slurm_executor(sweep_dir, workers, **kwargs)
    with executor.batch():
        jobs = [executor.submit(WorkerJob(str(sweep_dir), i)) for i in range(workers)]
    return jobs


def launch_ray(
    sweep_dir: Path,
    workers: int,
    *,
    gpus_per_worker: float | None = None,
    timeout_min: float | None = None,
) -> list[str | None]:
    """Run the same worker processes as Ray tasks on the cluster at ``$RAY_ADDRESS`` (else a
    local Ray); returns each worker's error text (None when it finished its share).

    ``gpus_per_worker`` defaults to 1 on a cluster with GPUs, else 0 (one CPU each).
    A worker that dies is not run again by Ray (its task failed); the trial it was
    running is requeued by the other workers when its heartbeat goes stale.
    """
    try:
        import ray
    except ImportError:
        raise SweepError(
            "--executor ray needs Ray, which is an optional extra: pip install 'jaxmint[ray]'"
        ) from None
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    # Ray sets CUDA_VISIBLE_DEVICES for a task that asks for GPUs; the worker inherits it.
    options = {"num_gpus": gpus_per_worker, "max_retries": 0}
    if not gpus_per_worker:
        options["num_cpus"] = 1
    task = ray.remote(**options)(lambda job: job())
    refs = [task.remote(WorkerJob(str(sweep_dir), i)) for i in range(workers)]
    deadline = None if timeout_min is None else time.monotonic() + 60 * timeout_min + 120
    errors: list[str | None] = []
    for ref in refs:
        left = None if deadline is None else max(1.0, deadline - time.monotonic())
        try:
            ray.get(ref, timeout=left)
            errors.append(None)
        except ray.exceptions.GetTimeoutError:
            for r in refs:
                ray.cancel(r, force=True)
            raise TimeoutError(
                f"sweep workers still running after {timeout_min} min; cancelled"
            ) from None
        except ray.exceptions.RayError as e:
            errors.append(_error_text(e))
    return errors


def wait(jobs, timeout_s: float, poll_s: float = 0.25) -> list[str | None]:
    """Wait for submitit jobs; returns each job's error text (None when it succeeded)."""
    deadline = time.monotonic() + timeout_s
    while not all(j.done() for j in jobs):
        if time.monotonic() > deadline:
            for j in jobs:
                j.cancel(check=False)
            raise TimeoutError(f"sweep workers still running after {timeout_s:.0f}s; cancelled")
        time.sleep(poll_s)
    errors = []
    for j in jobs:
        exc = j.exception()
        if exc is None:
            errors.append(None)
            continue
        errors.append(_error_text(exc))
    return errors


def _error_text(exc: BaseException) -> str:
    """The line of a failed worker job that says why (submitit and Ray wrap our message)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    ours = [x for x in lines if "sweep worker" in x]
    return (ours or lines or [repr(exc)])[-1]


def prepare(
    experiment: str | Path,
    sweep_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    trials: int | None = None,
    storage: str | None = None,
    heartbeat_s: float = 10.0,
    stale_after_s: float = 120.0,
) -> dict:
    """Check the experiment's sweep and overrides, and write (or continue) ``sweep.json``.

    Everything is checked here, before any worker starts: the script's ``sweep()``,
    that its space names config fields, and that the overrides parse.
    """

    experiment = str(Path(experiment).resolve())
    sweep_dir = Path(sweep_dir).resolve()
    module, spec = load_sweep(experiment)
    try:
        base_config(module, overrides)
    except SystemExit:
        raise SweepError(
            f"the config overrides {list(overrides)} do not parse for {experiment} (see the "
            "message above); `python EXPERIMENT.py --help` lists its flags"
        ) from None
    if heartbeat_s <= 0 or stale_after_s <= 2 * heartbeat_s:
        raise SweepError(
            f"stale_after_s={stale_after_s} must exceed twice heartbeat_s={heartbeat_s} (> 0), "
            "or live trials would be taken for dead ones"
        )
    state = {
        "experiment": experiment,
        "overrides": list(overrides),
        "spec": spec.describe(),
        "storage": storage,
        "trials": int(trials if trials is not None else spec.budget),
        "heartbeat_s": heartbeat_s,
        "stale_after_s": stale_after_s,
    }
    _study.write_state(sweep_dir, state)
    _study.open_study(sweep_dir, spec, storage)  # create it once, before workers race to
    return state
