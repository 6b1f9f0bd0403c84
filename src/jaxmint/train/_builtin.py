"""The hooks `fit` installs: each concern of the loop, written as a plain `Hook`.

In the order the loop calls them: `NonFiniteGuard` (stops before a poisoned
state is logged or saved), `RecompileWatch`, `Diagnose`, the user's hooks,
`Checkpointer`, `Writers` and `Progress`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import jax
import numpy as np

from jaxmint._tree import flat_with_names
from jaxmint.checkpoint import RunCheckpoints
from jaxmint.steps import build_diagnose_step
from jaxmint.track import JsonlWriter, ProgressBar, TensorBoardWriter
from jaxmint.train import _parallel as parallel
from jaxmint.train._hooks import Hook, Without
from jaxmint.train._preempt import Preemption

if TYPE_CHECKING:
    from jaxmint.train._fit import FitLoop

log = logging.getLogger("jaxmint")


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient under ``nonfinite="raise"``."""


def scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


class NonFiniteGuard(Hook):
    """``nonfinite="raise"``: stop at the next log or checkpoint after a non-finite step.

    The guard itself is computed in the step (a bad update is never applied); this
    hook reads it, records the step in the run dir for ``jaxmint diagnose --nan``,
    and raises `NonFiniteError` naming the terms and parameter groups.
    """

    def on_log(self, loop, step, state, batch, record):
        self.check(loop, state, record)

    def on_checkpoint(self, loop, step, state):
        self.check(loop, state)  # never save a poisoned state

    @staticmethod
    def check(loop, state, record=None) -> None:
        """Raise if a step was bad. A log ``record`` with ``skipped_steps`` 0 (the step's
        own count, already on the host) answers without fetching the guard."""
        if loop.settings.nonfinite != "raise" or (record or {}).get("skipped_steps") == 0:
            return
        guard = parallel.to_host(state.guard)
        if int(guard["first_bad_step"]) < 0:
            return
        names = ["total", *loop.steps.term_names]
        terms = [n for n, bad in zip(names, guard["bad_terms"], strict=True) if bad]
        groups = loop.steps.param_groups(state.params)
        groups = [g for g, bad in zip(groups, guard["bad_groups"], strict=True) if bad]
        bad_step = int(guard["first_bad_step"])
        kept = ""
        if loop.checkpoints is not None and loop.checkpoints.latest_step() is not None:
            kept = f" The last good checkpoint (step {loop.checkpoints.latest_step()}) is kept."
        if loop.run_dir is not None and loop.lead:
            loop.run_dir.write_nonfinite({"step": bad_step, "terms": terms, "groups": groups})
            kept += f" To see where it appeared: jaxmint diagnose {loop.run_dir.path} --nan."
        raise NonFiniteError(
            f"non-finite values at step {bad_step}: loss terms {terms or 'none'}, gradients of "
            f"parameter groups {groups or 'none'}. That update was not applied.{kept} Lower the "
            "learning rate, check the inputs, or pass nonfinite='skip' to skip such steps."
        )


class RecompileWatch(Hook):
    """Warn when the train step compiles again, naming the argument that changed.

    At each log it reads the jitted step's cache size (one C++ call); the
    arguments' shapes and dtypes are read only at the first log and after a
    recompile, to compare with those of the version before.
    """

    def __init__(self):
        self.size = None
        self.signature = None

    @staticmethod
    def _signature(state, batch) -> dict:
        return {
            name: (
                tuple(np.shape(x)),
                str(getattr(x, "dtype", type(x).__name__)),
                bool(getattr(x, "weak_type", False)),
            )
            for name, x in flat_with_names({"state": state, "batch": batch}).items()
        }

    def on_log(self, loop, step, state, batch, record):
        self.check(loop.train_step, state, batch)

    def check(self, fn, state, batch) -> None:
        cache_size = getattr(fn, "_cache_size", None)
        if cache_size is None or batch is None:
            return
        size = cache_size()
        if size == self.size:
            return
        signature = self._signature(state, batch)
        if self.size is not None and size > self.size:
            changed = [
                f"{k}: {self.signature.get(k)} -> {v}"
                for k, v in signature.items()
                if self.signature.get(k) != v
            ]
            log.warning(
                "the train step compiled again (%d versions); changed arguments: %s",
                size,
                changed[:5] or "none visible (a static value or a weak type in a hook?)",
            )
        self.size, self.signature = size, signature


class Diagnose(Hook):
    """Every ``every`` steps, log per-term gradient statistics, per-layer norms and
    update ratios, and activation statistics (``diag/...``), from a separately
    jitted step on the state after the update and that step's batch."""

    def __init__(self, every: int):
        self.every = every
        self.step_fn = None
        self.pending = None

    def on_start(self, loop, state):
        self.step_fn = jax.jit(
            build_diagnose_step(loop.model, loop.loss, loop.optimizer, input_key=loop.input_key)
        )

    def on_step(self, loop, step, state, batch, out):
        if step % self.every == 0:
            self.pending = self.step_fn(state, batch)
            loop.request_log()

    def on_log(self, loop, step, state, batch, record):
        if self.pending is not None:
            diag = parallel.to_host(self.pending)
            record.update({k: scalar(v) for k, v in diag.items()})
            self.pending = None


class Checkpointer(Hook):
    """Saves every ``checkpoint_every`` steps, at the end and on preemption.

    Records each step's ``best_metric`` for the keep policy, and installs the
    SIGTERM/SIGINT handlers that make the loop save and stop at the next step.

    Saves are asynchronous; what they cost is measured, and a warning names it once
    when it exceeds ``warn_fraction``: the part the loop waits for (the copy of the
    state, and with several processes also a previous save still in flight, pruning
    and orbax's start of the save) against the time between saves; and on a CPU
    backend, where orbax's writer threads take cores from the training itself, the
    CPU time of one save against that of the steps between saves (`SaveCpuShare`;
    in a run of one process).
    """

    def __init__(self, checkpoints: RunCheckpoints, best_metric: str, warn_fraction=0.1):
        self.checkpoints = checkpoints
        self.best_metric = best_metric
        self.preemption = Preemption()
        self.warn_fraction = warn_fraction
        self.warned = False
        self._last_save: float | None = None  # when the previous periodic save returned
        self.cpu_share: SaveCpuShare | None = None  # on a CPU backend

    def on_start(self, loop, state):
        self.preemption.install()
        loop.preemption = self.preemption
        if loop.on_cpu and jax.process_count() == 1:
            self.cpu_share = SaveCpuShare()

    def on_log(self, loop, step, state, batch, record):
        if isinstance(record.get(self.best_metric), int | float):
            self.checkpoints.record_score(step, record[self.best_metric])

    def on_checkpoint(self, loop, step, state):
        meta = {"data_position": loop.data.position(step), "loss_terms": loop.steps.term_names}
        cpu = None if loop.final else self.cpu_share
        if cpu is not None:
            self._judge_cpu(loop, cpu.share(state))
        timed = cpu is not None and cpu.times_next()
        if timed:  # this save alone: nothing else in flight
            self.checkpoints.wait()
            jax.block_until_ready(state)
            cpu_start = time.process_time()
        start = time.perf_counter()
        data_state = loop.data.iterator_state(step)
        self.checkpoints.save(step, state, meta=meta, final=loop.final, data_state=data_state)
        end = time.perf_counter()
        if self.preemption.signal or timed:
            self.checkpoints.wait()
        if timed:
            cpu.timed(time.process_time() - cpu_start)
        if not loop.final:
            self._measure(loop, start, end)

    def _measure(self, loop, start: float, end: float) -> None:
        # The first save is not judged: it includes one-time setup (threads, directories).
        previous, self._last_save = self._last_save, end
        if previous is None or self.warned:
            return
        blocked, interval = end - start, end - previous
        if blocked > self.warn_fraction * interval:
            self.warned = True
            log.warning(
                "checkpointing takes %.0f%% of the training time: the loop waits %.0f ms per "
                "save, one save every %s steps (%.0f ms). Save less often (--checkpoint-every), "
                "or keep fewer steps (--keep-last)",
                100 * blocked / interval,
                1000 * blocked,
                loop.settings.checkpoint_every,
                1000 * interval,
            )

    def _judge_cpu(self, loop, found: tuple[float, float, float] | None) -> None:
        if found is None or self.warned:
            return
        share, per_save, between = found
        if share > self.warn_fraction:
            self.warned = True
            log.warning(
                "checkpointing takes %.0f%% of the CPU time: a save costs %.0f ms of CPU "
                "(timed once, alone), and the %s steps between saves %.0f ms; on a CPU "
                "backend orbax's writer threads share the cores with the training. Save "
                "less often (--checkpoint-every)",
                100 * share,
                1000 * per_save,
                loop.settings.checkpoint_every,
                1000 * between,
            )

    def on_end(self, loop, result):
        self.preemption.uninstall()
        self.checkpoints.close()


class SaveCpuShare:
    """What periodic saves cost in CPU time on a CPU backend, measured once.

    There orbax's writer threads take cores from the training, and what the loop
    waits for says nothing of it. So the second periodic save (the first holds
    one-time setup) runs alone: the loop waits for the save before it and for the
    state, then times the save's process CPU time until it is written. The steps to
    the next save, with no save in flight, time the training's own CPU (logging and
    evaluation included). `share` gives the saves' part of the two.
    """

    def __init__(self):
        self.saves = 0
        self.save_cpu: float | None = None  # CPU seconds of the timed save
        self.since: float | None = None  # the CPU clock when it was written

    def times_next(self) -> bool:
        """Called before each periodic save: whether to time this one."""
        self.saves += 1
        return self.saves == 2

    def timed(self, seconds: float) -> None:
        self.save_cpu, self.since = seconds, time.process_time()

    def share(self, state) -> tuple[float, float, float] | None:
        """Before the save after the timed one: ``(share of the CPU time, CPU s per
        save, CPU s of the steps between saves)``; None at any other save."""
        if self.saves != 2 or self.since is None:
            return None
        jax.block_until_ready(state)  # the steps of the interval, all done
        train = time.process_time() - self.since
        self.since = None  # judged once
        return self.save_cpu / (self.save_cpu + train), self.save_cpu, train


class Writers(Hook):
    """``metrics.jsonl`` and TensorBoard events (written by the first process only)."""

    def __init__(self, run_dir):
        self.writers = [JsonlWriter(run_dir.metrics_file), TensorBoardWriter(run_dir.events_dir)]

    def on_log(self, loop, step, state, batch, record):
        for w in self.writers:
            w.write(record)

    def on_end(self, loop, result):
        for w in self.writers:
            w.close()


class Progress(Hook):
    """The live progress bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def on_start(self, loop, state):
        self.bar = ProgressBar(loop.settings.steps, loop.start_step, enabled=self.enabled)

    def on_step(self, loop, step, state, batch, out):
        self.bar.advance(step)

    def on_log(self, loop, step, state, batch, record):
        self.bar.show(step, record["loss"])

    def on_end(self, loop, result):
        if self.bar is not None:
            self.bar.close()


def assemble_hooks(loop: FitLoop, user: list[Hook]) -> list[Hook]:
    """The built-in hooks around the user's; a user hook that is an instance of a
    built-in's class takes its place, and `without` removes built-ins."""
    s = loop.settings
    removed = tuple(c for h in user if isinstance(h, Without) for c in h.classes)
    user = [h for h in user if not isinstance(h, Without)]
    computing: list[Hook] = [NonFiniteGuard()]
    if not s.debug:
        computing.append(RecompileWatch())
        if s.diagnose_every:
            computing.append(Diagnose(s.diagnose_every))
    writing: list[Hook] = []
    if loop.checkpoints is not None:
        writing.append(Checkpointer(loop.checkpoints, s.best_metric))
    if loop.run_dir is not None and loop.lead:
        writing.append(Writers(loop.run_dir))
    writing.append(Progress(s.progress and loop.lead and not s.debug))

    def place(builtin: Hook) -> list[Hook]:
        if isinstance(builtin, removed):
            return []
        mine = [h for h in user if isinstance(h, type(builtin))]
        for h in mine:
            user.remove(h)
        return mine or [builtin]

    first = [h for b in computing for h in place(b)]
    last = [h for b in writing for h in place(b)]
    return first + user + last
