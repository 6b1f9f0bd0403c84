"""Damaged checkpoints: a flipped byte is found by the digest, never restored in silence."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint import losses
from jaxmint.checkpoint import CheckpointError, RunCheckpoints
from jaxmint.run import load_params

DIGEST = "jaxmint_digest.json"


def _fit(toy, workdir, steps, **kw):
    return jaxmint.fit(
        jaxmint.models.mlp((16,), num_outputs=3),
        losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        toy,
        steps=steps,
        batch_size=32,
        workdir=workdir,
        checkpoint_every=10,
        keep_last=3,
        log_every=1,
        progress=False,
        **kw,
    )


def _flip(step_dir: Path, n: int = 64) -> Path:
    """Flip ``n`` bytes in the middle of the step's largest array file."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_every_completed_step_has_a_digest(tmp_path, toy):
    _fit(toy, tmp_path, 30)
    for step in (10, 20, 30):
        assert (tmp_path / "checkpoints" / str(step) / DIGEST).is_file()


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_with_a_warning(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 20)
    _flip(tmp_path / "checkpoints" / "20")
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, 30)
    assert "checkpoint at step 20 could not be read" in caplog.text
    assert "step 20 is damaged" in caplog.text and "resuming from step 10" in caplog.text
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert [r["step"] for r in result.history] == list(range(1, 31))
    aside = list((tmp_path / "checkpoints.damaged").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["20"]  # kept for inspection, not deleted
    # The run resumed from 10 exactly as a straight run would.
    straight = _fit(toy, tmp_path / "straight", 30)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(result.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_params_refuses_a_damaged_step_and_names_it(tmp_path, toy):
    _fit(toy, tmp_path, 20)
    _flip(tmp_path / "checkpoints" / "20")
    with pytest.raises(CheckpointError, match=r"step 20 is damaged.*pick another step"):
        load_params(tmp_path)
    params, step = load_params(tmp_path, 10)
    assert step == 10 and set(params["params"]) == {"dense0", "head"}


def test_a_damaged_digest_file_is_named(tmp_path, toy):
    _fit(toy, tmp_path, 10)
    (tmp_path / "checkpoints" / "10" / DIGEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="digest file .* is damaged"):
        load_params(tmp_path)


def test_a_step_without_digest_is_restored_with_a_warning(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 10)
    (tmp_path / "checkpoints" / "10" / DIGEST).unlink()  # as a step killed before its digest
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, 15)
    assert "step 10 has no digest" in caplog.text and "unverified" in caplog.text
    assert result.history[-1]["step"] == 15


def test_the_keep_policy_never_deletes_the_last_verified_checkpoint(tmp_path):
    state = {"w": np.arange(4, dtype=np.float32)}
    ckpt = RunCheckpoints(tmp_path / "c", keep_last=1)
    ckpt.save(10, state)
    ckpt.wait()
    ckpt.save(20, state)
    ckpt.wait()
    ckpt.close()
    (tmp_path / "c" / "20" / DIGEST).unlink()  # as if killed between its save and its digest
    ckpt = RunCheckpoints(tmp_path / "c", keep_last=1)
    ckpt.save(30, state)  # in flight: not yet verified either
    assert ckpt.steps() == [10, 30]  # 10, the last verified, survives keep_last=1
    ckpt.close()
    ckpt = RunCheckpoints(tmp_path / "c", keep_last=1)
    ckpt.save(40, state, final=True)  # 30 is verified now: 10 may go
    assert ckpt.steps() == [40]
    ckpt.close()  # waits for the background deletions too
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.isdigit()) == ["40"]
