"""Checkpoints of a run directory with orbax: async saves, keep policy, exact resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxmint._tree import flat_with_names
from jaxmint.train._state import TrainState

log = logging.getLogger("jaxmint")

# Fields of a run's config that may change between a run and its resumption.
RUN_CONTROL_FIELDS = frozenset(
    {
        "workdir",
        "steps",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "fresh",
        "progress",
        "smoke",
        "keep_last",
        "keep_best",
        "strategy",
        "coordinator",
        "num_processes",
        "process_id",
        "diagnose_every",
        "summary",
    }
)


class CheckpointError(RuntimeError):
    """Checkpoints exist but cannot be used; the message says what to do."""


class Preempted(SystemExit):
    """Raised after a SIGTERM/SIGINT once the checkpoint is saved; exit code 128 + signal."""


def _shapes(tree) -> dict[str, tuple]:
    return {name: tuple(np.shape(x)) for name, x in flat_with_names(tree).items()}


def _diff_config(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
        for k in keys
        if k not in RUN_CONTROL_FIELDS and old.get(k) != new.get(k)
    ]


class RunCheckpoints:
    """The checkpoints of one run directory, under ``workdir/checkpoints/``.

    Saves are asynchronous: `save` copies the state on device and returns while
    orbax writes in the background (atomically: a save interrupted at any moment
    leaves no half-written step behind). Keeps the last ``keep_last`` steps plus
    the best ``keep_best`` by ``best_metric``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        run_config: dict | None = None,
        keep_last: int = 2,
        keep_best: int = 0,
        best_metric: str = "eval/loss",
        best_mode: str = "min",
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.run_config = run_config or {}
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.keep_last, self.keep_best = keep_last, keep_best
        # The keep policy is applied here (see _prune), not by orbax: it must survive a
        # restart, so the scores come from metrics.jsonl, which outlives the process.
        self._options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True)
        self._manager = None
        self._scores: dict[int, float] = {}
        self.stop_requested = False
        self._signal = None
        self._old_handlers: dict = {}

    # -- lifecycle -------------------------------------------------------------
    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options, item_handlers=_handlers()
            )
        return self._manager

    def close(self) -> None:
        self.restore_signal_handlers()
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- save ------------------------------------------------------------------
    def on_log(self, step: int, state, record: dict, batch_pos: int) -> None:
        del state, batch_pos
        if isinstance(record.get(self.best_metric), int | float):
            self._scores[step] = float(record[self.best_metric])

    def kept_steps(self, steps: list[int]) -> set[int]:
        """The last ``keep_last`` steps plus the best ``keep_best`` by ``best_metric``."""
        keep = set(sorted(steps)[-self.keep_last :])
        scored = [s for s in steps if s in self._scores]
        ranked = sorted(scored, key=self._scores.get, reverse=self.best_mode == "max")
        return keep | set(ranked[: self.keep_best])

    def _prune(self, upcoming: int | None = None) -> None:
        self.manager.wait_until_finished()  # never delete under a save in flight
        steps = self.steps()
        keep = self.kept_steps(steps + ([upcoming] if upcoming is not None else []))
        for step in steps:
            if step not in keep:
                self.manager.delete(step)

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_position: dict | None = None,
        final: bool = False,
    ) -> None:
        """Start an async save of ``state`` at ``step`` (a no-op if already saved).

        ``data_position`` (e.g. epoch and index) is stored beside the state; the
        loader's order is a pure function of (seed, epoch), so this and the step
        are all that is needed to continue on the same batch.
        """
        if step in self.manager.all_steps():
            return
        # The next train step donates (reuses) the state's buffers, so the
        # background writer gets its own copy: one device memcpy of the state.
        snapshot = jax.tree_util.tree_map(jnp.copy, state._asdict())
        self._prune(upcoming=step)
        meta = {
            "step": step,
            "time": time.time(),
            "final": final,
            "data_position": data_position or {},
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(snapshot), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        if final:
            self.manager.wait_until_finished()
            self._prune()

    # -- restore ---------------------------------------------------------------
    def restore_or_init(self, state: TrainState, *, fresh: bool = False) -> tuple[TrainState, int]:
        """Resume from the newest intact checkpoint, or start ``state`` at step 0.

        Falls back to older checkpoints when the newest cannot be read (with a
        warning naming both steps) and refuses to start when none can.
        """
        if fresh:
            self._move_aside()
        steps = self.steps()
        if not steps:
            self._trim_metrics(0)
            return state, 0
        self._check_config(state, steps[-1])
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            state._asdict(),
        )
        failures = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
                )
            except Exception as e:  # orbax raises many types for damaged files
                failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                continue
            if failures:
                log.warning(
                    "checkpoint at step %d could not be read (%s); resuming from step %d instead",
                    failures[0][0],
                    failures[0][1],
                    step,
                )
                self._set_aside([s for s, _ in failures])
            self._trim_metrics(step)
            self._load_scores()
            return TrainState(**restored["state"]), step
        detail = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise CheckpointError(
            f"{self.directory} holds checkpoints at steps {steps} but none can be read ({detail})."
            " Refusing to silently restart from step 0. To start over, pass --fresh (fit(..., "
            "fresh=True)), which moves the old checkpoints aside, or use a new --workdir."
        )

    def _check_config(self, state: TrainState, step: int) -> None:
        stored_path = self.workdir / "config.json"
        old_cfg = {}
        if stored_path.exists():
            old_cfg = json.loads(stored_path.read_text()).get("config", {})
        new_cfg = self.run_config.get("config", {})
        differing = _diff_config(old_cfg, new_cfg)
        try:
            meta = self.manager.item_metadata(step)
            stored = meta.get("state", None)
        except Exception:  # unreadable metadata: restore will report it
            stored = None
        if stored is not None:
            old_shapes = _shapes(_as_plain(stored))
            new_shapes = _shapes(state._asdict())
            bad = sorted(
                k
                for k in set(old_shapes) | set(new_shapes)
                if old_shapes.get(k) != new_shapes.get(k)
            )
            if bad:
                shown = ", ".join(
                    f"{k}: {old_shapes.get(k, 'absent')} -> {new_shapes.get(k, 'absent')}"
                    for k in bad[:5]
                )
                raise CheckpointError(
                    f"the run dir {self.workdir} belongs to a different model: the checkpoint at "
                    f"step {step} has different state shapes ({shown}"
                    f"{', ...' if len(bad) > 5 else ''}). Config fields that differ: "
                    f"{differing or 'none recorded'}. Use a new --workdir, or --fresh to move the "
                    "old checkpoints aside."
                )
        if differing:
            log.warning("resuming %s with changed config fields: %s", self.workdir, differing)

    def _set_aside(self, steps: list[int]) -> None:
        """Move unreadable steps to ``checkpoints.damaged/`` (kept for inspection, not used)."""
        self.manager.wait_until_finished()
        target = self.workdir / "checkpoints.damaged"
        target.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            src = self.directory / str(step)
            if src.exists():
                src.rename(target / f"{step}-{stamp}")
                log.warning("moved the unreadable checkpoint %s to %s", src, target)
        self._manager.close()
        self._manager = None  # re-list the steps

    def _load_scores(self) -> None:
        from jaxmint.track import read_metrics

        path = self.workdir / "metrics.jsonl"
        if path.exists():
            for record in read_metrics(path):
                if isinstance(record.get(self.best_metric), int | float):
                    self._scores[int(record["step"])] = float(record[self.best_metric])

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in ("checkpoints", "metrics.jsonl", "tb"):
            path = self.workdir / name
            if path.exists():
                path.rename(self.workdir / f"{name}.old-{stamp}")
                log.warning("moved %s aside to %s.old-%s (--fresh)", path, name, stamp)
        self._manager = None

    def _trim_metrics(self, step: int) -> None:
        """Drop logged records past ``step``: the resumed run writes them again."""
        path = self.workdir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)

    # -- preemption ------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: save at the next step boundary; a second SIGINT exits at once."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            del frame
            if self.stop_requested and signum == signal.SIGINT:
                os.write(2, b"\nsecond interrupt: exiting now without saving\n")
                os._exit(130)
            self.stop_requested = True
            self._signal = signal.Signals(signum).name
            os.write(2, f"\n{self._signal}: saving a checkpoint at the next step\n".encode())

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, handler)
        self._watch_second_interrupt()

    def _watch_second_interrupt(self) -> None:
        """Exit on a second SIGINT even while the main thread is stuck in C code.

        Python runs signal handlers in the main thread between bytecodes, so during
        a long compile or a blocking call the handler above would wait. The C-level
        handler also writes the signal number to a wakeup pipe at once; this thread
        reads it and exits the process on the second SIGINT.
        """
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._old_wakeup_fd = signal.set_wakeup_fd(write_fd)
        except ValueError:  # not the main thread of the main interpreter
            os.close(read_fd)
            os.close(write_fd)
            return
        self._wakeup_fds = (read_fd, write_fd)

        def watch():
            interrupts = 0
            while True:
                try:
                    data = os.read(read_fd, 64)
                except OSError:
                    return
                if not data:  # restore_signal_handlers closed the write end
                    os.close(read_fd)
                    return
                interrupts += data.count(bytes([signal.SIGINT]))
                if interrupts >= 2:
                    os.write(2, b"\nsecond interrupt: exiting now without saving\n")
                    os._exit(130)

        threading.Thread(target=watch, daemon=True, name="jaxmint-interrupts").start()

    def restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}
        fds = getattr(self, "_wakeup_fds", None)
        if fds is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            os.close(fds[1])  # the watcher reads EOF and ends
            self._wakeup_fds = None

    def exit_after_stop(self, step: int) -> None:
        self.manager.wait_until_finished()
        code = 128 + signal.Signals[self._signal].value  # 143 for SIGTERM, 130 for SIGINT
        print(
            f"{self._signal}: saved a checkpoint at step {step} in {self.directory}. "
            "Run the same command again (same --workdir) to resume.",
            file=sys.stderr,
            flush=True,
        )
        raise Preempted(code)


def _handlers() -> dict:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _as_plain(metadata_tree):
    """Orbax array metadata -> objects with ``.shape``/``.dtype`` for comparison."""
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) if hasattr(m, "shape") else m,
        dict(metadata_tree) if not isinstance(metadata_tree, dict) else metadata_tree,
    )


def load_params(workdir: str | os.PathLike, step: int | str | None = None) -> tuple[Any, int]:
    """Load the weights of a run dir: the latest step, a given ``step``, or ``"best"``.

    Returns ``({"params": ..., "model_state": ...}, step)`` as numpy arrays. Used by
    export; needs no model code (orbax restores without a target).
    """
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{workdir} has no checkpoints/ directory; is it a run dir?")
    options = ocp.CheckpointManagerOptions(create=False)
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())
    try:
        available = sorted(manager.all_steps())
        if not available:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        if step is None:
            chosen = available[-1]
        elif step == "best":
            chosen = _best_step(Path(workdir), available)
        else:
            if int(step) not in available:
                raise CheckpointError(f"no checkpoint at step {step}; available: {available}")
            chosen = int(step)
        try:
            restored = manager.restore(
                chosen, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"the checkpoint at step {chosen} in {directory} cannot be read "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pick another step "
                f"from {available}"
            ) from None
        state = restored["state"]
        return {"params": state["params"], "model_state": state["model_state"]}, chosen
    finally:
        manager.close()


def _best_step(workdir: Path, available: list[int]) -> int:
    config = (
        json.loads((workdir / "config.json").read_text())
        if (workdir / "config.json").exists()
        else {}
    )
    ckpt = config.get("checkpoint", {})
    metric = ckpt.get("best_metric", "eval/loss")
    mode = ckpt.get("best_mode", "min")
    from jaxmint.track import read_metrics

    scores = {
        int(r["step"]): r[metric]
        for r in read_metrics(workdir)
        if metric in r and int(r["step"]) in available
    }
    if not scores:
        raise CheckpointError(
            f"no kept checkpoint of {workdir} has a logged {metric!r}; pass a step instead"
        )
    pick = min if mode == "min" else max
    return pick(scores, key=scores.get)
