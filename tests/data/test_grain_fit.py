"""fit on Grain: resumed to the bit after SIGKILL, user pipelines, several processes."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint import losses
from jaxmint.data import DataError, NpyShards, write_npy_shards

HERE = Path(__file__).parent
STEPS, EVERY = 40, 8  # digits: 22 steps of 64 per epoch, so kills land mid-epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    train, _ = jaxmint.data.digits()
    path = tmp_path_factory.mktemp("data") / "train"
    write_npy_shards(train, path, rows_per_shard=400)
    return path


def start(shards, workdir, workers, pause=0.0):
    args = [str(shards), str(workdir), str(STEPS), str(EVERY), str(workers), str(pause)]
    return subprocess.Popen(
        [sys.executable, str(HERE / "grain_trainer.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def wait_for_step(proc, step, timeout=120):
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return
        assert time.monotonic() < deadline, "trainer too slow"
    raise AssertionError(f"trainer ended before step {step}: {proc.stderr.read()[-2000:]}")


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, gathered over its threads (a thread may end
    between listing and reading; its children then pass to another of the threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def finish(proc, timeout=180):
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def final_params(workdir):
    with np.load(Path(workdir) / "final.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_sigkill_twice_mid_epoch_resumes_to_the_bit(tmp_path, shards):
    reference = tmp_path / "reference"
    finish(start(shards, reference, workers=0))
    run = tmp_path / "run"
    # Read by 2 worker processes; killed mid-epoch after the saves at 8 and 24.
    for kill_at in (11, 27):
        proc = start(shards, run, workers=2, pause=0.02)
        wait_for_step(proc, kill_at)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # Grain's 2 workers (and its resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The killed trainer could not stop its workers: they notice and exit.
        deadline = time.monotonic() + 10
        while (alive := [p for p in workers if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"worker processes {alive} outlived the killed trainer"
    err = finish(start(shards, run, workers=2))
    assert "no data iterator state" not in err
    got, want = final_params(run), final_params(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    state = json.loads((run / "checkpoints" / "40" / "data" / "process_0-of-1.json").read_text())
    assert state  # the iterator state, saved by Grain's orbax handler
    steps = [r["step"] for r in jaxmint.run.RunDir(run).metrics()]
    assert steps == list(range(1, STEPS + 1))


def train(data, workdir, **kw):
    settings = dict(steps=20, batch_size=32, seed=1, checkpoint_every=5, progress=False)
    return jaxmint.fit(
        jaxmint.models.mlp((32,), 10, dropout=0.1),
        losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        data,
        workdir=workdir,
        **(settings | kw),
    )


def same(a, b):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_a_users_grain_dataset_and_loader_resume_from_their_saved_state(tmp_path, shards, caplog):
    source = NpyShards(shards)
    pipelines = {
        "map": lambda: grain.MapDataset.source(source).shuffle(seed=4).repeat().batch(32),
        "iter": lambda: (
            grain.MapDataset.source(source).shuffle(seed=4).repeat().to_iter_dataset().batch(32)
        ),
        "loader": lambda: grain.DataLoader(
            data_source=source,
            sampler=grain.samplers.IndexSampler(len(source), shuffle=True, seed=4),
            operations=[grain.transforms.Batch(32, drop_remainder=True)],
        ),
    }
    for name, make in pipelines.items():
        straight = train(make(), tmp_path / f"{name}-straight")
        train(make(), tmp_path / name, stop_after=12)  # saved at 5, 10 and 12; resumed at 12
        with caplog.at_level(logging.WARNING, logger="jaxmint"):
            resumed = train(make(), tmp_path / name)
        assert "no data iterator state" not in caplog.text
        assert same(resumed.params, straight.params), name
        saved = tmp_path / name / "checkpoints" / "20" / "data" / "process_0-of-1.json"
        assert saved.is_file(), name


def test_an_unbatched_or_non_dict_grain_dataset_is_named(shards):
    source = NpyShards(shards)
    with pytest.raises(DataError, match=r"leading axes .* batch it with \.batch\(32"):
        train(grain.MapDataset.source(source), None)
    with pytest.raises(DataError, match="yields int, not a batch"):
        train(grain.MapDataset.range(100), None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_disjoint_shares_covering_the_epoch_once(tmp_path):
    train_arrays, _ = jaxmint.data.digits()
    n = 22 * 64  # one epoch is exactly 22 global batches
    data = {k: v[:n] for k, v in train_arrays.items()} | {"id": np.arange(n)}
    write_npy_shards(data, tmp_path / "shards", rows_per_shard=300)
    seen: dict[int, dict[int, list[int]]] = {}  # step -> process -> ids
    for stop_after in (11, 22):  # a checkpoint at 11; the second run resumes there
        port = free_port()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "grain_multihost_worker.py"),
                    str(port),
                    str(i),
                    str(tmp_path / "shards"),
                    str(tmp_path / "run"),
                    str(stop_after),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]
        for i, (out, _) in enumerate(outs):
            for line in out.splitlines():
                if line.startswith("IDS "):
                    step, *ids = map(int, line.split()[1:])
                    seen.setdefault(step, {})[i] = ids
    assert sorted(seen) == list(range(1, 23))
    for step, by_process in seen.items():
        assert len(by_process[0]) == len(by_process[1]) == 32, step
        assert not set(by_process[0]) & set(by_process[1]), step
    everything = [i for by_process in seen.values() for ids in by_process.values() for i in ids]
    assert sorted(everything) == list(range(n))  # the epoch, each example exactly once
    saved = tmp_path / "run" / "checkpoints" / "11" / "data"
    assert sorted(p.name for p in saved.iterdir()) == ["process_0-of-2.json", "process_1-of-2.json"]


class SyntheticRows:
    """A column made a slice at a time (what the writers read), never held whole."""

    def __init__(self, n: int, width: int | None):
        self.shape = (n, width) if width else (n,)
        self.dtype = np.dtype(np.float32 if width else np.int32)

    def __getitem__(self, rows: slice) -> np.ndarray:
        index = np.arange(*rows.indices(self.shape[0]))
        if len(self.shape) == 1:
            return (index % 10).astype(np.int32)
        rows = np.random.default_rng(index[:1]).random((len(index), self.shape[1]), np.float32)
        rows[np.arange(len(index)), index % 10] += 3.0  # the label, learnable
        return rows


LIMIT_MIB = 2000  # a training process on CPU peaks near 1.7 GiB of address space


@pytest.mark.slow
def test_a_dataset_larger_than_the_memory_limit_trains(tmp_path):
    n = 540_000  # rows of 4 KiB: 2.1 GiB
    columns = {"x": SyntheticRows(n, 1024), "y": SyntheticRows(n, None)}
    write_npy_shards(columns, tmp_path / "big", rows_per_shard=4096)
    size_mib = sum(f.stat().st_size for f in (tmp_path / "big").iterdir()) >> 20
    assert size_mib > LIMIT_MIB
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # The limit bites: reading the dataset into memory under it fails.
    load_all = (
        "import resource, sys, numpy as np, glob;"
        f"resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_MIB << 20}, {LIMIT_MIB << 20}));"
        f"xs = [np.load(f) for f in sorted(glob.glob('{tmp_path / 'big'}/x-*.npy'))]"
    )
    control = subprocess.run([sys.executable, "-c", load_all], capture_output=True, text=True)
    assert control.returncode != 0 and "MemoryError" in control.stderr
    args = [str(tmp_path / "big"), "30", str(LIMIT_MIB), "1"]  # one worker process too
    out = subprocess.run(
        [sys.executable, str(HERE / "limited_trainer.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peak = int(out.stdout.split("PEAK_MIB ")[1].split()[0])
    assert peak < LIMIT_MIB < size_mib
    assert float(out.stdout.split("LOSS ")[1].split()[0]) < 2.3  # it learned from the files
