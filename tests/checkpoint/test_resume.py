"""Exact resume after SIGKILL, clean exit on SIGTERM, damaged checkpoints, keep policy."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint import losses
from jaxmint.checkpoint import CheckpointError, RunCheckpoints, _manager
from jaxmint.checkpoint._manager import DIGEST
from jaxmint.run import RunDir, load_params
from jaxmint.train import NonFiniteError

TRAINER = Path(__file__).with_name("trainer.py")
STEPS, EVERY = 40, 4


def start(workdir, every=EVERY, pause=0.0, model="mlp"):
    return subprocess.Popen(
        [sys.executable, str(TRAINER), str(workdir), str(STEPS), str(every), str(pause), model],
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


def finish(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def final_params(workdir):
    with np.load(Path(workdir) / "final.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    finish(start(workdir))
    return final_params(workdir)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bit_identical(tmp_path, reference):
    workdir = tmp_path / "run"
    # 1: before the first checkpoint exists; 2: between checkpoints;
    # 3: saving every step with a pause, killed right after a save started.
    for kill_at, every, pause in ((2, EVERY, 0.0), (14, EVERY, 0.0), (25, 1, 0.05)):
        proc = start(workdir, every=every, pause=pause)
        wait_for_step(proc, kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finish(start(workdir))
    got = final_params(workdir)
    assert got.keys() == reference.keys()
    for k in reference:
        assert np.array_equal(got[k], reference[k]), k
    steps = [r["step"] for r in RunDir(workdir).metrics()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_cleanly(tmp_path, reference):
    workdir = tmp_path / "run"
    proc = start(workdir, pause=0.05)
    wait_for_step(proc, 6)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert "Run the same command again" in err
    saved = load_params(workdir)[1]
    assert 6 <= saved < STEPS  # the step boundary after the signal, not a scheduled one
    finish(start(workdir))
    got = final_params(workdir)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)


# -- in-process cases --------------------------------------------------------------


def _fit(data, workdir, **kw):
    kw.setdefault("progress", False)
    model = kw.pop("model", jaxmint.models.mlp((16,), num_outputs=3))
    loss = kw.pop("loss", losses.softmax_cross_entropy())
    return jaxmint.fit(model, loss, optax.adam(1e-2), data, workdir=workdir, **kw)


def _corrupt(step_dir: Path):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")


def test_corrupt_latest_falls_back_with_warning(tmp_path, toy, caplog):
    workdir = tmp_path / "run"
    _fit(toy, workdir, steps=20, batch_size=32, checkpoint_every=10, keep_last=3, log_every=1)
    _corrupt(workdir / "checkpoints/20")
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(
            toy, workdir, steps=25, batch_size=32, checkpoint_every=10, keep_last=3, log_every=1
        )
    assert "checkpoint at step 20 could not be read" in caplog.text
    assert "resuming from step 10" in caplog.text
    assert result.history[-1]["step"] == 25
    assert [r["step"] for r in result.history] == list(range(1, 26))  # none duplicated


def test_all_unreadable_refuses_then_fresh_moves_aside(tmp_path, toy):
    workdir = tmp_path / "run"
    _fit(toy, workdir, steps=20, batch_size=32, checkpoint_every=10, keep_last=3)
    for d in (workdir / "checkpoints").iterdir():
        if d.name.isdigit():
            _corrupt(d)
    with pytest.raises(CheckpointError, match=r"steps \[10, 20\] but none can be read.*--fresh"):
        _fit(toy, workdir, steps=30, batch_size=32)
    result = _fit(toy, workdir, steps=5, batch_size=32, fresh=True, log_every=5)
    assert [r["step"] for r in result.history] == [1, 5]  # started over
    aside = [p.name for p in workdir.iterdir() if p.name.startswith("checkpoints.old-")]
    assert len(aside) == 1
    assert (workdir / aside[0] / "20").is_dir()  # nothing saved is lost


def test_different_model_in_same_run_dir_names_fields(tmp_path, toy):
    workdir = tmp_path / "run"
    _fit(toy, workdir, steps=4, batch_size=32, config={"hidden": [16], "lr": 0.01})
    with pytest.raises(
        CheckpointError,
        match=r"different model.*\(5, 16\) -> \(5, 32\).*"
        r"hidden: \[16\] -> \[32\]",
    ):
        _fit(
            toy,
            workdir,
            steps=8,
            batch_size=32,
            config={"hidden": [32], "lr": 0.01},
            model=jaxmint.models.mlp((32,), num_outputs=3),
        )


def test_keep_last_plus_best_and_load_params(tmp_path, toy):
    workdir = tmp_path / "run"
    # "max" of eval/loss keeps the worst (earliest) checkpoint: easy to tell apart.
    _fit(
        toy,
        workdir,
        steps=40,
        batch_size=32,
        checkpoint_every=10,
        eval_every=10,
        eval_data=toy,
        keep_last=1,
        keep_best=1,
        best_mode="max",
    )
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [10, 40]
    _params, step = load_params(workdir, "best")
    assert step == 10
    latest, step = load_params(workdir)
    assert step == 40
    assert set(latest["params"]) == {"dense0", "head"}
    with pytest.raises(
        CheckpointError, match=r"no checkpoint at step 20; available steps: \[10, 40\]"
    ):
        load_params(workdir, 20)


def test_nonfinite_raise_keeps_last_good_checkpoint(tmp_path, toy):
    def poison(out, batch):
        return jnp.where(batch["step_marker"][:, 0] > 0, jnp.nan, 0.0) + 0 * out[:, 0]

    data = dict(toy)
    data["step_marker"] = np.zeros((96, 1), np.float32)
    loss = losses.softmax_cross_entropy() + losses.term(poison, name="poison")
    _fit(data, tmp_path / "run", steps=6, batch_size=32, checkpoint_every=3, loss=loss)
    data["step_marker"][:] = 1.0
    with pytest.raises(NonFiniteError, match=r"step 7.*'poison'.*checkpoint \(step 6\) is kept"):
        _fit(
            data,
            tmp_path / "run",
            steps=12,
            batch_size=32,
            checkpoint_every=3,
            loss=loss,
            log_every=1,
        )
    params, step = load_params(tmp_path / "run")
    assert step == 6
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_load_params_errors(tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoints: train with a workdir"):
        load_params(tmp_path)
    shutil.rmtree(tmp_path)


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path):
    proc = start(tmp_path / "run", pause=3.0)  # each step then sleeps 3 s in a hook
    wait_for_step(proc, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert time.monotonic() - t0 < 2.5  # did not wait for the step to end
    assert "second interrupt: exiting now without saving" in err


def test_checkpoint_records_data_position(tmp_path, toy):
    import orbax.checkpoint as ocp

    _fit(toy, tmp_path / "run", steps=7, batch_size=32, checkpoint_every=7)
    meta = ocp.CheckpointManager(
        tmp_path / "run/checkpoints", item_handlers={"meta": ocp.JsonCheckpointHandler()}
    ).restore(7, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert meta["data_position"] == {"epoch": 2, "index": 1}  # 3 batches per epoch


def test_keep_best_survives_a_restart(tmp_path, toy):
    kw = dict(
        batch_size=32,
        checkpoint_every=10,
        eval_every=10,
        eval_data=toy,
        keep_last=1,
        keep_best=1,
        best_mode="max",
    )
    _fit(toy, tmp_path / "run", steps=30, **kw)
    _fit(toy, tmp_path / "run", steps=50, **kw)
    kept = sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit())
    assert kept == [10, 50]


def test_damaged_step_is_set_aside_and_written_again(tmp_path, toy):
    workdir = tmp_path / "run"
    _fit(toy, workdir, steps=20, batch_size=32, checkpoint_every=10, keep_last=2)
    _corrupt(workdir / "checkpoints/20")
    _fit(toy, workdir, steps=20, batch_size=32, checkpoint_every=10, keep_last=2)
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints.damaged").iterdir()] == ["20"]
    params, step = load_params(workdir)
    assert step == 20 and all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_nnx_model_with_dropout_resumes(tmp_path, toy):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(5, 16, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)
            self.out = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(nnx.relu(self.lin(x))))

    model = jaxmint.models.from_nnx(Net)
    _fit(toy, tmp_path / "run", model=model, steps=4, batch_size=32)
    result = _fit(toy, tmp_path / "run", model=model, steps=8, batch_size=32, log_every=1)
    assert [r["step"] for r in result.history][-4:] == [5, 6, 7, 8]


def test_nonfinite_between_log_and_checkpoint_is_not_saved(tmp_path, toy):
    def poison(out, batch):
        return jnp.where(batch["flag"][:, 0] > 0, jnp.nan, 0.0) + 0 * out[:, 0]

    loss = losses.softmax_cross_entropy() + losses.term(poison, name="poison")
    data = {**toy, "flag": np.zeros((96, 1), np.float32)}
    data["flag"][40:72] = 1.0  # some batches of epoch 2 onwards are poisoned
    with pytest.raises(NonFiniteError):
        _fit(
            data,
            tmp_path / "run",
            loss=loss,
            steps=30,
            batch_size=32,
            checkpoint_every=2,
            log_every=25,
        )
    clean = {**toy, "flag": np.zeros((96, 1), np.float32)}
    result = _fit(
        clean,
        tmp_path / "run",
        loss=loss,
        steps=30,
        batch_size=32,
        checkpoint_every=2,
        log_every=25,
    )
    assert result.history[-1]["step"] == 30


def test_a_save_that_stalls_the_loop_is_named_once(tmp_path, toy, caplog):
    """Saving after every step of a tiny model: the loop mostly waits for saves."""
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        jaxmint.fit(
            jaxmint.models.mlp((8,), num_outputs=3),
            losses.softmax_cross_entropy(),
            optax.sgd(0.1),
            toy,
            steps=6,
            batch_size=16,
            workdir=tmp_path / "run",
            checkpoint_every=1,
            progress=False,
        )
    stalls = [r.getMessage() for r in caplog.records if "checkpointing takes" in r.getMessage()]
    assert len(stalls) == 1, stalls  # the loop's wait, or (on CPU) the saves' CPU time
    assert "ms per save, one save every 1 steps" in stalls[0] or (
        "of the CPU time" in stalls[0] and "the 1 steps between saves" in stalls[0]
    )
    assert "--checkpoint-every" in stalls[0]


def test_a_save_that_costs_little_is_not_reported(caplog):
    from jaxmint.train import Checkpointer

    class Loop:
        final = False
        settings = type("S", (), {"checkpoint_every": 50})

    hook = Checkpointer(checkpoints=None, best_metric="eval/loss")
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        for start in (0.0, 1.0, 2.0, 3.0):  # 5 ms blocked per 1 s between saves
            hook._measure(Loop(), start, start + 0.005)
        assert not caplog.records and not hook.warned
        hook._measure(Loop(), 3.5, 3.7)  # 200 ms of 0.7 s
    assert hook.warned and "29% of the training time" in caplog.records[0].getMessage()


def test_saves_whose_background_cpu_slows_training_are_named_once(tmp_path, caplog):
    """The digits MLP at batch 256, saving every 25 steps on a CPU backend: the loop
    waits a few ms per save, but orbax's writer threads take about a fifth of the CPU."""
    train, _ = jaxmint.data.digits()
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        jaxmint.fit(
            jaxmint.models.mlp((512, 512), num_outputs=10),
            losses.softmax_cross_entropy(),
            optax.adam(1e-3),
            train,
            steps=150,
            batch_size=256,
            workdir=tmp_path / "run",
            checkpoint_every=25,
            log_every=25,
            progress=False,
        )
    said = [r.getMessage() for r in caplog.records if "checkpointing takes" in r.getMessage()]
    assert len(said) == 1, said
    assert "of the CPU time: a save costs" in said[0], said[0]
    assert "the 25 steps between saves" in said[0] and "--checkpoint-every" in said[0]


def test_the_second_save_is_timed_alone_against_the_steps_after_it(monkeypatch):
    from jaxmint.train import _builtin

    clock = [0.0]
    monkeypatch.setattr(_builtin.time, "process_time", lambda: clock[0])
    share = _builtin.SaveCpuShare()
    assert share.share(None) is None and share.times_next() is False  # 1st: setup
    clock[0] += 5.0
    assert share.share(None) is None and share.times_next() is True  # 2nd: timed
    share.timed(0.06)
    clock[0] += 0.24  # the steps to the 3rd save
    assert share.share(None) == pytest.approx((0.2, 0.06, 0.24))
    assert share.times_next() is False
    clock[0] += 1.0
    assert share.share(None) is None  # judged once


@pytest.mark.parametrize("host_copies", [True, False])
def test_a_saved_state_keeps_each_leafs_dtype_and_takes_the_targets_placement(
    tmp_path, monkeypatch, host_copies
):
    """One process saves a small state as host copies (orbax's numpy path; typed PRNG
    keys as they are) and a large one as jax arrays; either way a restore gives jax
    arrays with the target's dtypes and shardings, values unchanged."""
    if not host_copies:
        monkeypatch.setattr(_manager, "HOST_COPY_MAX_BYTES", 16)  # "large": over 16 bytes
    state = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "half": jnp.linspace(-1, 1, 5, dtype=jnp.bfloat16),
        "step": jnp.asarray(7, jnp.int32),
        "key": jax.random.key(3),
        "raw_key": jax.random.PRNGKey(4),
    }
    ckpt = RunCheckpoints(tmp_path / "checkpoints")
    ckpt.save(5, state)
    ckpt.close()
    saved = json.loads((tmp_path / "checkpoints" / "5" / "state" / "_METADATA").read_text())
    kinds = {k: v["value_metadata"]["value_type"] for k, v in saved["tree_metadata"].items()}
    assert kinds["('w',)"] == ("np.ndarray" if host_copies else "jax.Array"), kinds
    placed = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), state
    )
    ckpt = RunCheckpoints(tmp_path / "checkpoints")
    restored, meta = ckpt.restore(5, target)
    ckpt.close()
    assert meta["step"] == 5
    for name, want in state.items():
        got = restored[name]
        assert isinstance(got, jax.Array) and got.sharding == placed, name
        assert got.dtype == want.dtype, name
        if name == "key":
            want, got = jax.random.key_data(want), jax.random.key_data(got)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def test_a_save_returns_before_orbax_starts_it_and_its_error_raises_at_the_next_call(tmp_path):
    """In one process the loop does not wait for orbax's start of a save (a saver thread
    runs it); what that start raises comes back from the next call, not lost."""
    ckpt = RunCheckpoints(tmp_path / "checkpoints")
    state = {"w": jnp.arange(3.0)}
    returned, starts = threading.Event(), []
    orbax_save = ckpt.manager.save

    def save_after_the_call_returned(step, *args, **kwargs):
        starts.append(returned.wait(timeout=5))  # True: the caller was not waiting
        if step == 2:
            raise OSError("No space left on device")
        return orbax_save(step, *args, **kwargs)

    ckpt.manager.save = save_after_the_call_returned
    ckpt.save(1, state)
    returned.set()
    ckpt.wait()
    assert starts == [True] and ckpt.steps() == [1]

    returned.clear()
    ckpt.save(2, state)
    returned.set()
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(3, state)
    assert starts == [True, True]
    ckpt.save(4, state, final=True)  # the last save of a run is complete when it returns
    assert ckpt.steps() == [1, 4] and (tmp_path / "checkpoints" / "4" / DIGEST).is_file()
    ckpt.close()
