"""Checkpoints of one directory with orbax: async saves, keep policy, damaged-step fallback.

This layer knows its own directory and nothing else of a run: the run directory
(`jaxmint.run.RunDir`) hands it the paths and the metric scores of its keep
policy, and the train loop decides what the state is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger("jaxmint")

DIGEST = "jaxmint_digest.json"
"""Written inside each step's folder once its save completes: the sha256 of every file."""

HOST_COPY_MAX_BYTES = 256 << 20
"""In a run of one process, a state of up to this many bytes goes to orbax as host
(numpy) copies: orbax's numpy path skips the sharding and replica bookkeeping of its
`jax.Array` path (`benchmarks/checkpoint.py --model mlp`: 79 -> 46-54 ms of CPU per
save of a 3.6 MB state). A larger state goes as `jax.Array`s, which orbax writes
shard by shard without assembling a second copy on the host (orbax deep-copies
numpy arrays, and `device_get` gathers sharded ones)."""


class CheckpointError(RuntimeError):
    """Checkpoints exist but cannot be used; the message says what to do."""


class Preempted(SystemExit):
    """Raised after a SIGTERM/SIGINT once the checkpoint is saved; exit code 128 + signal."""


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class RunCheckpoints:
    """The checkpoints under ``directory``, one orbax step per saved train step.

    Saves are asynchronous: `save` copies the state and returns while orbax writes
    it in the background (atomically: a save interrupted at any moment leaves no
    half-written step behind); steps the keep policy drops are deleted in the
    background too. In a run of one process, even orbax's start of a save (and the
    keep policy) runs on a saver thread: every other method first waits for that
    start, and raises what it raised. Keeps the last ``keep_last`` steps plus
    the best ``keep_best`` by the scores given to `record_score` (the keep policy
    is applied here, not by orbax, so that it survives a restart: the caller
    passes the scores it logged before).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        damaged_dir: str | os.PathLike | None = None,
        keep_last: int = 2,
        keep_best: int = 0,
        best_mode: str = "min",
        scores: Mapping[int, float] | None = None,
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory).absolute()
        self.damaged_dir = Path(damaged_dir or f"{self.directory}.damaged").absolute()
        self.keep_last, self.keep_best, self.best_mode = keep_last, keep_best, best_mode
        self._scores: dict[int, float] = dict(scores or {})
        self._manager = None
        self._undigested: list[int] = []  # saved, digest not yet written
        self._verified: set[int] | None = None  # steps with a digest (read from disk once)
        self._saver: ThreadPoolExecutor | None = None
        self._starting: Future | None = None  # a save being started on the saver thread

    # -- lifecycle -------------------------------------------------------------
    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            # Deleting a step the keep policy drops happens on orbax's deleter thread,
            # not in the train loop (`close` waits for it).
            options = ocp.CheckpointManagerOptions(
                enable_async_checkpointing=True, create=True, enable_background_delete=True
            )
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=_handlers()
            )
        return self._manager

    def close(self) -> None:
        try:
            self._started()
        finally:
            if self._saver is not None:
                self._saver.shutdown()
                self._saver = None
            if self._manager is not None:
                self._finish()
                self._manager.close()
                self._manager = None

    def wait(self) -> None:
        """Wait for saves in flight, then write the digests of the steps they completed."""
        self._started()
        self._finish()

    def _started(self) -> None:
        """Wait until the save handed to the saver thread has started; raise its error.
        (Never called on the saver thread itself.)"""
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.result()

    def _finish(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
        for step in self._undigested:
            if jax.process_index() == 0:  # one writer; every process knows the step is done
                write_digest(self.directory / str(step))
            self._verified_steps().add(step)
        self._undigested = []

    def _verified_steps(self) -> set[int]:
        """Steps with a digest: read from disk once, then kept in step on every process
        (so that all processes of a run apply the same keep policy)."""
        if self._verified is None:
            self._verified = {
                int(p.parent.name)
                for p in self.directory.glob(f"*/{DIGEST}")
                if p.parent.name.isdigit()
            }
        return self._verified

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def steps(self) -> list[int]:
        self._started()
        return self._steps()

    def _steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(self.manager.all_steps())

    # -- keep policy -----------------------------------------------------------
    def record_score(self, step: int, value: float) -> None:
        self._started()  # the saver thread applies the keep policy, which reads the scores
        self._scores[step] = float(value)

    def kept_steps(self, steps: list[int]) -> set[int]:
        """The last ``keep_last`` steps plus the best ``keep_best`` by their scores, and
        always the newest step whose digest is written (the last verified one)."""
        keep = set(sorted(steps)[-self.keep_last :])
        scored = [s for s in steps if s in self._scores]
        ranked = sorted(scored, key=self._scores.get, reverse=self.best_mode == "max")
        verified = [s for s in steps if s in self._verified_steps()]
        return keep | set(ranked[: self.keep_best]) | set(sorted(verified)[-1:])

    def _prune(self, upcoming: int | None = None) -> None:
        self._finish()  # never delete under a save in flight; digest what completed
        steps = self._steps()
        keep = self.kept_steps(steps + ([upcoming] if upcoming is not None else []))
        for step in steps:
            if step not in keep:
                self.manager.delete(step)

    # -- save ------------------------------------------------------------------
    def save(
        self,
        step: int,
        state,
        *,
        meta: dict | None = None,
        final: bool = False,
        data_state: bytes | None = None,
    ) -> None:
        """Start an async save of ``state`` (a pytree) at ``step``; a no-op if already saved.

        ``meta`` is JSON stored beside the arrays (the data position, the loss's
        term names): what a resumed run needs besides the state. ``data_state`` is a
        Grain iterator's state, saved by Grain's orbax handler (one file per process).
        """
        self._started()
        if step in self.manager.all_steps():
            if final:
                self._prune()  # the step's digest is written now: older ones may go
            return
        # The next train step donates (reuses) the state's buffers, so the
        # background writer gets its own copy: one device memcpy of the state.
        snapshot = _snapshot(_as_dict(state))
        one_process = jax.process_count() == 1
        if one_process and _nbytes(snapshot) <= HOST_COPY_MAX_BYTES:
            # One process holds every array: host copies (see HOST_COPY_MAX_BYTES);
            # a restore places the arrays under whatever mesh its target names.
            snapshot = jax.device_get(snapshot)
        meta = {"step": step, "time": time.time(), "final": final, **(meta or {})}
        if final or not one_process:  # (several processes: orbax's barriers in order)
            self._start(step, snapshot, meta, final, data_state)
        else:  # the loop goes on while orbax starts the save (it waits for nothing here)
            if self._saver is None:
                self._saver = ThreadPoolExecutor(1, thread_name_prefix="jaxmint-checkpoint")
            self._starting = self._saver.submit(
                self._start, step, snapshot, meta, final, data_state
            )

    def _start(self, step: int, snapshot, meta: dict, final: bool, data_state) -> None:
        self._prune(upcoming=step)
        items = {"state": ocp.args.StandardSave(snapshot), "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:
            items["data"] = _grain_checkpoint().CheckpointSave(IteratorState(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._undigested.append(step)
        if final:
            self._prune()

    # -- restore ---------------------------------------------------------------
    def stored_structure(self, step: int) -> dict | None:
        """The saved state of ``step`` as a tree of `jax.ShapeDtypeStruct` (None: unreadable)."""
        self._started()
        try:
            stored = self.manager.item_metadata(step).get("state", None)
        except Exception:  # unreadable metadata: restoring the step will report it
            return None
        if stored is None:
            return None
        return jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) if hasattr(m, "shape") else m,
            dict(stored),
        )

    def restore(self, step: int, target: Any = None) -> tuple[dict, dict]:
        """``(state, meta)`` of ``step``; ``target`` (abstract arrays with shardings) places it.

        The step's files are checked against its digest first; a difference raises
        `CheckpointError` naming the file. A step without a digest (saved by an older
        version, or stopped before its digest was written) is restored with a warning.
        """
        self._started()
        check_digest(self.directory / str(step), step)
        restore = ocp.args.StandardRestore(target) if target is not None else None
        args = ocp.args.Composite(
            state=restore or ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return restored["state"], dict(restored["meta"] or {})

    def restore_data(self, step: int) -> bytes | None:
        """The Grain iterator state saved at ``step`` for this process (None: none saved)."""
        self._started()
        if not (self.directory / str(step) / "data").is_dir():
            return None
        receiver = IteratorState()
        args = ocp.args.Composite(data=_grain_checkpoint().CheckpointRestore(receiver))
        try:
            self.manager.restore(step, args=args)
        except Exception as e:  # orbax and grain raise many types for damaged files
            raise CheckpointError(
                f"the data iterator state of step {step} in {self.directory} cannot be read "
                f"({_first_line(e)})"
            ) from None
        return receiver.state

    def restore_newest(self, target_for: Callable[[int], Any]) -> tuple[dict, dict, int] | None:
        """Restore the newest readable step: ``(state, meta, step)``, or None when there is none.

        ``target_for(step)`` gives the restore target of a step. Unreadable steps
        are moved to ``damaged_dir`` (kept, not deleted) with a warning naming both
        steps; when no step can be read, a `CheckpointError` says what to do.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, target_for(step))
            except Exception as e:  # orbax raises many types for damaged files
                failures.append((step, _first_line(e)))
                continue
            if failures:
                log.warning(
                    "checkpoint at step %d could not be read (%s); resuming from step %d instead",
                    failures[0][0],
                    failures[0][1],
                    step,
                )
                self.set_aside([s for s, _ in failures])
            return state, meta, step
        if not steps:
            return None
        detail = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise CheckpointError(
            f"{self.directory} holds checkpoints at steps {steps} but none can be read ({detail})."
            " Refusing to silently restart from step 0. To start over, pass --fresh (fit(..., "
            "fresh=True)), which moves the old checkpoints aside, or use a new --workdir."
        )

    def set_aside(self, steps: list[int]) -> None:
        """Move unreadable steps to ``damaged_dir`` (kept for inspection, not used)."""
        self.wait()
        self.damaged_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            src = self.directory / str(step)
            if src.exists():
                src.rename(self.damaged_dir / f"{step}-{stamp}")
                log.warning("moved the unreadable checkpoint %s to %s", src, self.damaged_dir)
        self.close()  # re-list the steps


def write_digest(step_dir: Path) -> None:
    """Record the sha256 of every file of a completed step, atomically."""
    if not step_dir.is_dir():
        return  # deleted by the keep policy before its digest was due
    digests = _digests(step_dir)
    tmp = step_dir / f".{DIGEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(digests, indent=1, sort_keys=True))
    os.replace(tmp, step_dir / DIGEST)


def check_digest(step_dir: Path, step: int) -> None:
    """Raise `CheckpointError` if a file of the step differs from its digest."""
    path = step_dir / DIGEST
    if not path.is_file():
        log.warning(
            "the checkpoint at step %d has no digest (saved by an older version, or stopped "
            "before the digest was written): restoring it unverified",
            step,
        )
        return
    try:
        want = json.loads(path.read_text())
    except ValueError:
        raise CheckpointError(f"step {step}: its digest file {path} is damaged") from None
    have = _digests(step_dir)
    bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if bad:
        raise CheckpointError(
            f"step {step} is damaged: {len(bad)} file(s) differ from the digest written when "
            f"it was saved ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        )


def _digests(step_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.name != DIGEST and not path.name.startswith(f".{DIGEST}"):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            out[path.relative_to(step_dir).as_posix()] = digest.hexdigest()
    return out


class IteratorState:
    """A data iterator's saved state, as Grain's orbax handler saves and restores it
    (frozen when the step is saved, since the live iterator reads on)."""

    def __init__(self, state: bytes | None = None):
        self.state = state

    def get_state(self) -> bytes | None:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        pass


def _grain_checkpoint():
    import grain.checkpoint

    return grain.checkpoint


def _handlers() -> dict:
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with contextlib.suppress(ImportError):  # without Grain (the data extra) no data state
        handlers["data"] = _grain_checkpoint().CheckpointHandler()
    return handlers


@jax.jit
def _snapshot(tree):
    """A copy of every array of ``tree`` in one dispatch (jitted once per tree structure)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def _nbytes(tree) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree))


def _as_dict(state):
    return state._asdict() if hasattr(state, "_asdict") else state


def read_weights(directory: str | os.PathLike, step: int | None = None) -> tuple[dict, int]:
    """Read the weights in a checkpoint directory: the latest step, or ``step``.

    Returns ``({"params": ..., "model_state": ...}, step)`` as numpy arrays
    (``model_state`` is None for a model whose variables are all parameters).
    Needs no model code: orbax restores without a target.
    """
    state, chosen = read_state(directory, step)
    return {"params": state["params"], "model_state": state.get("model_state")}, chosen


def read_state(
    directory: str | os.PathLike, step: int | None = None, target: Any = None
) -> tuple[dict, int]:
    """Read the train state of the latest step, or ``step``, in a checkpoint directory:
    ``(state, step)``, shaped and placed like ``target`` (None: as stored, numpy)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory.parent} has no checkpoints: train with a workdir (the run saves at the "
            "end, and every --checkpoint-every steps) before exporting or inspecting it"
        )
    ckpt = RunCheckpoints(directory)
    try:
        available = ckpt.steps()
        if not available:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        chosen = available[-1] if step is None else int(step)
        if chosen not in available:
            raise CheckpointError(f"no checkpoint at step {step}; available steps: {available}")
        try:
            state, _ = ckpt.restore(chosen, target)
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"the checkpoint at step {chosen} in {directory} cannot be read "
                f"({_first_line(e)}); pick another step from {available}"
            ) from None
        return state, chosen
    finally:
        ckpt.close()
