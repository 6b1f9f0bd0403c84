"""`fit`: a plain Python loop around the jitted pure step, driven by hooks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from jaxmint.data import prefetch_to_device
from jaxmint.losses import Loss
from jaxmint.models._model import Model
from jaxmint.run import RunDir
from jaxmint.state import TrainState
from jaxmint.train import _parallel as parallel
from jaxmint.train import _setup as setup
from jaxmint.train._builtin import NonFiniteGuard, assemble_hooks, scalar
from jaxmint.train._config import FitConfig, resolve_settings
from jaxmint.train._hooks import FitResult, Hook, as_hooks, overrides

log = logging.getLogger("jaxmint")


def fit(
    model: Model,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    data: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    *,
    eval_data: Mapping[str, np.ndarray] | None = None,
    metrics: Mapping[str, Callable] | None = None,
    hooks: Sequence[Hook | Callable[[int, dict], None]] = (),
    input_key: str = "x",
    config: Any = None,
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
    **settings: Any,
) -> FitResult:
    """Train ``model`` on ``loss`` with ``optimizer`` for ``steps`` steps.

    The train step is jitted once, with the state donated; the loop around it
    logs every ``log_every`` steps and the first (the only host syncs),
    evaluates every ``eval_every`` steps and at the end, and checkpoints every
    ``checkpoint_every`` steps and at the end. Calling `fit` again with the same
    ``workdir`` resumes from its latest checkpoint, with the loss as the code
    now writes it.

    Args:
      data: a dict of numpy arrays (shuffled each epoch as a pure function of
        ``seed`` and the epoch) or an iterable of batches of ``batch_size``.
      eval_data: a dict of arrays evaluated in full (``eval/<name>`` metrics).
      metrics: per-example metrics ``fn(outputs, batch)`` logged by name, and as
        ``eval/<name>`` on evaluation.
      hooks: `Hook` objects, or callables ``(step, record)`` called at each log.
      input_key: the batch key fed to the model.
      rules: logical axis name -> mesh axes (a name, a tuple of names, or None),
        for parameters with logical axis names on a ``mesh``; default
        ``jaxmint.train.DEFAULT_RULES`` (heads, mlp and vocab over ``tensor``,
        embed over ``fsdp``).
      config: the experiment's config (a dataclass or dict), saved in
        ``config.json`` so the run can be exported and resumed. A `FitConfig`
        (such as an experiment's config, which extends it) also supplies the
        settings.
      **settings: any field of `FitConfig` (each is described in the training guide):
        ``steps`` and ``batch_size`` (required unless ``config`` has them), ``seed``,
        ``workdir`` (a path or a `jaxmint.run.RunDir`), ``eval_every``,
        ``checkpoint_every``, ``strategy`` or a ``mesh`` such as ``{"data": -1,
        "fsdp": 2}``, ``nonfinite``, ``grad_accum``, ``compute_dtype``, ``log_every``,
        ``debug``, ``check``, ``diagnose_every``, the keep policy and more.

    Example::

        result = jaxmint.fit(model, losses.softmax_cross_entropy(), optax.adam(1e-3),
                             train, steps=500, batch_size=64, eval_data=test)
        print(result.final_eval["eval/accuracy"])
    """
    workdir = settings.pop("workdir", getattr(config, "workdir", None))
    loop = FitLoop(
        model,
        loss,
        optimizer,
        data,
        settings=resolve_settings(config, settings),
        workdir=workdir,
        eval_data=eval_data,
        metrics=metrics,
        hooks=as_hooks(hooks),
        input_key=input_key,
        config=config,
        rules=rules,
    )
    return loop.run()


class FitLoop:
    """One training run: the compiled steps, the data, the run dir and the hooks.

    Hooks receive it: ``settings`` (the `FitConfig`), ``run_dir`` (a `RunDir` or
    None), ``steps`` (the pure `Steps`), ``start_step``, ``history``, ``lead``
    (this process writes files), ``on_cpu`` (the run's devices are CPUs), ``final``
    (the last checkpoint), ``stop`` (the signal that asked the run to stop),
    `evaluate`, `request_log` and `request_stop`.
    """

    def __init__(
        self,
        model,
        loss,
        optimizer,
        data,
        *,
        settings: FitConfig,
        workdir,
        eval_data,
        metrics,
        hooks: list[Hook],
        input_key: str,
        config,
        rules=None,
    ):
        self.settings, self.rules = settings, rules
        self.replay_before = (
            None if settings.replay_from is None else setup.replay_steps(settings, workdir)
        )
        self.model, self.loss, self.optimizer, self.input_key = model, loss, optimizer, input_key
        self.eval_data, self.start_step, self.final, self.preemption = eval_data, 0, False, None
        self._log_requested = False
        self.stopped: str | None = None
        setup.prepare(self, data, metrics)  # strategy and mesh, data, the pure steps
        state = setup.init_state(self)
        setup.compile_steps(self, state)
        self.run_dir = None if workdir is None else RunDir.of(workdir)
        self.checkpoints, self.history = None, []
        if self.run_dir is not None:
            state = setup.open_run(self, state, config)
        self.state = state
        self.hooks = assemble_hooks(self, hooks)

    # -- what hooks may call -----------------------------------------------------
    def request_log(self) -> None:
        """Log (and call ``on_log``) after the current step, whatever ``log_every`` says."""
        self._log_requested = True

    def request_stop(self, reason: str) -> None:
        """End the run after the current step, as if it were the last: it is logged
        (and evaluated), checkpointed, and `fit` returns with ``result.stopped``."""
        self.stopped = reason

    @property
    def stop(self) -> str | None:
        return self.preemption.signal if self.preemption is not None else None

    def put(self, batch):
        """Place a batch for the step: sharded over the mesh, or as it is on one CPU."""
        if self.data_sharding is not None:
            return parallel.to_global(batch, self.data_sharding)
        # On a CPU the jitted step takes numpy as is: an explicit device_put (and a
        # prefetch thread to hide it) would only add host work. Accelerators
        # prefetch: the host-to-device copy overlaps the running step.
        return batch if self.on_cpu else jax.device_put(batch)

    def evaluate(self, state: TrainState, eval_data=None) -> dict:
        """``eval/<name>`` means over all of ``eval_data`` (default: fit's), for ``state``."""
        return setup.evaluate(self, state, self.eval_data if eval_data is None else eval_data)

    # -- the loop ----------------------------------------------------------------
    def run(self) -> FitResult:
        s = self.settings
        no_prefetch = s.debug or s.check or (self.on_cpu and self.data_sharding is None)
        prefetch = 0 if no_prefetch else s.prefetch
        batches = prefetch_to_device(self.data.batches(self.start_step), prefetch, put=self.put)
        # XLA's CPU client can deadlock in a collective when several steps are in flight on
        # many fake devices sharing few cores; there, wait for each step (GPUs/TPUs never do).
        sync_each_step = self.strategy != "single" and self.on_cpu
        on_step = [h for h in self.hooks if overrides(h, "on_step")]
        state, result, out, batch = self.state, None, None, None
        self._t_last, self._s_last = time.perf_counter(), self.start_step
        step = logged = self.start_step
        try:
            for h in self.hooks:
                h.on_start(self, state)
            last = s.stop_after or s.steps
            for step in range(self.start_step + 1, last + 1):
                try:
                    batch = next(batches)
                except StopIteration:
                    step -= 1
                    log.warning("data ran out after step %d; stopping early", step)
                    break
                state, out = self.train_step(state, batch)
                if sync_each_step:
                    jax.block_until_ready(out["loss"])
                for h in on_step:
                    h.on_step(self, step, state, batch, out)
                do_eval = self.eval_data is not None and (
                    step == s.steps or (s.eval_every is not None and step % s.eval_every == 0)
                )
                if (
                    step % s.log_every == 0
                    or step in (1, last)
                    or do_eval
                    or self.stop
                    or self._log_requested
                ):
                    self._log(step, state, batch, out, do_eval)
                    logged = step
                if self.stop or (s.checkpoint_every and step % s.checkpoint_every == 0):
                    self._checkpoint(step, state)
                if self.stopped:
                    log.info("stopping at step %d: %s", step, self.stopped)
                    break
            if out is not None and logged != step:  # stopped or out of data between log steps
                self._log(step, state, batch, out, self.eval_data is not None)
            if step > self.start_step:
                self.final = True
                self._checkpoint(step, state)
            self.state = state
            path = None if self.run_dir is None else self.run_dir.path
            result = FitResult(
                parallel.to_host(state.params), state, self.history, path, self.stopped
            )
        finally:
            try:
                for h in self.hooks:
                    h.on_end(self, result)
            finally:
                self.data.close()
        return result

    def _log(self, step, state, batch, out, do_eval) -> None:
        self._log_requested = False
        record = {"step": step, **{k: scalar(v) for k, v in parallel.to_host(out).items()}}
        now = time.perf_counter()
        record["steps_per_sec"] = (step - self._s_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._s_last = now, step
        if do_eval:
            NonFiniteGuard.check(self, state, record)  # name a bad step before evaluating it
            record.update(self.evaluate(state))
            for h in self.hooks:
                h.on_eval(self, step, state, record)
        for h in self.hooks:
            h.on_log(self, step, state, batch, record)
        self.history.append(record)

    def _checkpoint(self, step, state) -> None:
        for h in self.hooks:
            h.on_checkpoint(self, step, state)
        if self.stop:
            self.preemption.exit(step, self.run_dir.checkpoints_dir)
