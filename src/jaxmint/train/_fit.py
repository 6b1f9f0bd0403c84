"""`fit`: a plain Python loop around the jitted pure step."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxmint.data import ArrayLoader, BatchSpec, DataError, eval_batches, prefetch_to_device
from jaxmint.losses import Loss
from jaxmint.models._model import Model
from jaxmint.track import JsonlWriter, ProgressBar, TensorBoardWriter, read_metrics
from jaxmint.train import _parallel as parallel
from jaxmint.train._hooks import Hook, as_hooks
from jaxmint.train._state import TrainState
from jaxmint.train._step import build_steps

log = logging.getLogger("jaxmint")

STRATEGIES = ("auto", "single", "data", "fsdp", "pmap")
NONFINITE = ("raise", "skip")


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient under ``nonfinite="raise"``."""


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      params: the final trained parameters (on the host, as numpy).
      state: the final `TrainState` (on device).
      history: the logged records, the same dicts that are in ``metrics.jsonl``.
      workdir: the run directory, or None.
    """

    params: Any
    state: TrainState
    history: list[dict]
    workdir: Path | None

    @property
    def final_eval(self) -> dict:
        """The last logged ``eval/*`` metrics."""
        for record in reversed(self.history):
            evals = {k: v for k, v in record.items() if k.startswith("eval/")}
            if evals:
                return evals
        return {}


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)


def _first_batch(data, batch_size: int, seed: int, shard=(0, 1)):
    """Return ``(first_batch, batches(start_step) -> iterator, position(step) -> dict)``.

    With several processes, array data yields this process's rows of each global
    batch; an iterable must itself yield this process's share.
    """
    if isinstance(data, np.ndarray | jax.Array):
        raise DataError(
            f"data is a single array of shape {np.shape(data)}; pass a dict of arrays such as "
            "{'x': inputs, 'y': labels} (or an iterable of such dicts)"
        )
    if isinstance(data, Mapping):
        loader = ArrayLoader(data, batch_size, seed=seed, shard=shard)

        def position(step: int) -> dict:
            epoch, index = loader.position(step)
            return {"epoch": epoch, "index": index}

        return next(loader.batches(0)), loader.batches, position
    if not isinstance(data, Iterable):
        raise DataError(
            f"data must be a dict of numpy arrays or an iterable of batches, got "
            f"{type(data).__name__}"
        )
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError("data is an empty iterable: it yielded no batch") from None

    def batches(start_step: int):
        # An iterable cannot be rewound: resuming skips the batches already used.
        rest = itertools.chain([first], iterator)
        return itertools.islice(rest, start_step, None)

    return first, batches, lambda step: {"batches_consumed": step}


def fit(
    model: Model,
    loss: Loss,
    optimizer: optax.GradientTransformation,
    data: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    workdir: str | Path | None = None,
    eval_data: Mapping[str, np.ndarray] | None = None,
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    strategy: str = "auto",
    nonfinite: str = "raise",
    metrics: Mapping[str, Callable] | None = None,
    input_key: str = "x",
    grad_accum: int = 1,
    compute_dtype: Any = None,
    log_every: int = 50,
    eval_batch_size: int | None = None,
    hooks: Sequence[Hook | Callable[[int, dict], None]] = (),
    config: Any = None,
    progress: bool = True,
    prefetch: int = 2,
    keep_last: int = 2,
    keep_best: int = 0,
    best_metric: str = "eval/loss",
    best_mode: str = "min",
    fresh: bool = False,
    debug: bool = False,
    check: bool = False,
    diagnose_every: int | None = None,
) -> FitResult:
    """Train ``model`` on ``loss`` with ``optimizer`` for ``steps`` steps.

    The train step is jitted once, with the state donated; the loop around it
    logs every ``log_every`` steps (the only host syncs), evaluates every
    ``eval_every`` steps and at the end, and checkpoints every
    ``checkpoint_every`` steps and at the end. Calling `fit` again with the same
    ``workdir`` resumes from its latest checkpoint.

    Args:
      data: a dict of numpy arrays (shuffled each epoch as a pure function of
        ``seed`` and the epoch) or an iterable of batches of ``batch_size``.
      strategy: ``auto`` (``single`` on one device, else ``data``), ``single``,
        ``data``, ``fsdp`` or ``pmap``; see the parallel-training guide.
      nonfinite: ``raise`` stops at the next log step naming the first bad step,
        the non-finite loss terms and parameter groups (the bad update is never
        applied); ``skip`` leaves the state unchanged on such steps and counts
        them in ``skipped_steps``.
      metrics: per-example metrics ``fn(outputs, batch)`` logged by name, and as
        ``eval/<name>`` on evaluation.
      grad_accum: micro-batches per step (``batch_size`` must divide evenly).
      compute_dtype: e.g. ``"bfloat16"``: forward/backward in that dtype with
        float32 master params.
      hooks: `Hook` objects, or callables ``(step, record)`` called at each log.
      config: the experiment's config (a dataclass or dict) saved in
        ``config.json`` so the run can be exported and resumed.
      fresh: ignore (and move aside) existing checkpoints in ``workdir``.
      debug: run the train and eval steps un-jitted (``jax.disable_jit()``) on one
        device, with the configured batch size (the same batches as a normal run),
        so ``print`` and ``breakpoint()`` in a model, loss term or hook show real
        arrays. The run dir is marked as a debug run and never resumed by a normal
        run (nor the other way round). See the debugging guide.
      diagnose_every: every N steps, also log per-term gradient norms, shares and
        cosines, per-layer parameter/gradient norms and update ratios, and
        activation statistics (``diag/...``); a separately jitted step, so the
        other steps pay nothing (see the diagnosis guide for its cost).
      check: run the jitted train step through ``jax.experimental.checkify`` (NaNs,
        division by zero, out-of-bounds indexing, ``checkify.check`` calls) on one
        device, and raise `jaxmint.debug.CheckError` at the first failing step.
        One host sync per step; the normal path is unchanged when off.

    Example::

        result = jaxmint.fit(model, losses.softmax_cross_entropy(), optax.adam(1e-3),
                             train, steps=500, batch_size=64, eval_data=test)
        print(result.final_eval["eval/accuracy"])
    """
    from jaxmint.checkpoint import RunCheckpoints  # deferred: orbax import is slow

    _check_args(
        steps, batch_size, strategy, nonfinite, grad_accum, log_every, eval_every, checkpoint_every
    )
    if diagnose_every is not None and (not isinstance(diagnose_every, int) or diagnose_every < 1):
        raise ValueError(
            f"diagnose_every must be a positive integer or None, got {diagnose_every!r}"
        )
    hooks = as_hooks(hooks)
    strategy = parallel.resolve(strategy)
    if debug or check:
        strategy = _debug_strategy(strategy, debug, check)
        progress, prefetch = progress and not debug, 0
    parallel.check_batch(batch_size, grad_accum, strategy)
    mesh = None if strategy == "single" else parallel.make_mesh()
    n_proc, proc = jax.process_count(), jax.process_index()
    lead = proc == 0  # only the first process writes files and draws the progress bar
    local_batch = batch_size // n_proc

    # -- input ----------------------------------------------------------------
    first, batches_from, position = _first_batch(data, batch_size, seed, shard=(proc, n_proc))
    spec = BatchSpec(first)
    spec.require([input_key], "the model's input, input_key")
    got = np.shape(first[input_key])[0]
    if got != local_batch:
        raise DataError(
            f"the first batch has {got} examples but batch_size={batch_size}"
            + (f" over {n_proc} processes ({local_batch} each)" if n_proc > 1 else "")
            + "; an iterable must yield batches of that size"
        )
    if eval_data is not None:
        _check_eval_data(eval_data, spec)

    # -- state ----------------------------------------------------------------
    steps_fns = build_steps(
        model,
        loss,
        optimizer,
        input_key=input_key,
        metrics=metrics,
        grad_accum=grad_accum,
        compute_dtype=compute_dtype,
        axis_name=parallel.AXIS if strategy == "pmap" else None,
    )
    key = jax.random.PRNGKey(seed)
    # Every process initializes from the same (data-independent) sample, so params agree.
    sample = first if n_proc == 1 else {k: np.zeros_like(v[:1]) for k, v in first.items()}
    if debug:
        with jax.disable_jit():
            state = steps_fns.init(key, sample)
        shardings, data_sharding = None, None
    elif strategy == "single":
        state = jax.jit(steps_fns.init)(key, sample)
        shardings, data_sharding = None, None
    else:
        abstract = jax.eval_shape(steps_fns.init, key, sample)
        shardings = parallel.state_shardings(abstract, mesh, strategy)
        state = jax.jit(steps_fns.init, out_shardings=shardings)(key, sample)
        data_sharding = parallel.batch_sharding(mesh)
    if debug or check:
        train_step, eval_step = _debug_steps(steps_fns, model, loss, input_key, grad_accum, debug)
    else:
        train_step, eval_step = parallel.compile_steps(steps_fns, strategy, mesh, shardings)
    if not debug:  # a debug run compiles nothing; its first step shows any error itself
        # Trace once on shapes: a bad loss term or batch fails here, before compiling.
        global_first = {
            k: jax.ShapeDtypeStruct(
                (batch_size, *np.shape(v)[1:]), np.asarray(v).dtype, sharding=data_sharding
            )
            for k, v in first.items()
        }
        jax.eval_shape(steps_fns.train_step if check else train_step, state, global_first)

    workdir = Path(workdir) if workdir is not None else None
    ckpt = None
    start_step = 0
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        run_config = {
            "config": _config_dict(config),
            "fit": {
                "steps": steps,
                "batch_size": batch_size,
                "seed": seed,
                "input_key": input_key,
                "grad_accum": grad_accum,
                "compute_dtype": None if compute_dtype is None else str(compute_dtype),
                "strategy": strategy,
                "nonfinite": nonfinite,
            },
            "checkpoint": {
                "every": checkpoint_every,
                "keep_last": keep_last,
                "keep_best": keep_best,
                "best_metric": best_metric,
                "best_mode": best_mode,
            },
            "versions": {"jax": jax.__version__},
            "debug": debug,
        }
        ckpt = RunCheckpoints(
            workdir,
            run_config=run_config,
            keep_last=keep_last,
            keep_best=keep_best,
            best_metric=best_metric,
            best_mode=best_mode,
        )
        if debug or (workdir / "DEBUG_RUN").exists():
            from jaxmint.debug._modes import check_run_kind, mark_run

            check_run_kind(workdir, debug, fresh=fresh, has_checkpoints=bool(ckpt.steps()))
            mark_run(workdir, debug)
        state, start_step = ckpt.restore_or_init(state, fresh=fresh)
        (workdir / "config.json").write_text(json.dumps(run_config, indent=2, default=str))

    eval_bs = eval_batch_size or batch_size
    diagnose_step = None
    if diagnose_every and not debug:
        from jaxmint.diagnose import build_diagnose_step

        diagnose_step = jax.jit(build_diagnose_step(model, loss, optimizer, input_key=input_key))
    watch = RecompileWatch()
    eval_bs = -(-eval_bs // jax.device_count()) * jax.device_count()  # divisible by devices

    on_cpu = jax.devices()[0].platform == "cpu"

    def put(batch):
        if data_sharding is None:
            # On a CPU the jitted step takes numpy as is: an explicit device_put (and a
            # prefetch thread to hide it) would only add host work. Accelerators
            # prefetch: the host-to-device copy overlaps the running step.
            return batch if on_cpu else jax.device_put(batch)
        return parallel.to_global(batch, data_sharding)

    def run_eval(state) -> dict:
        sums: dict[str, float] = {}
        count = 0
        per = eval_bs // n_proc
        for batch, n in eval_batches(eval_data, eval_bs):
            local = {k: v[proc * per : (proc + 1) * per] for k, v in batch.items()}
            out = parallel.to_host(eval_step(state, put(local), np.int32(n)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
        return {f"eval/{k}": v / count for k, v in sums.items() if not k.startswith("weight/")}

    # -- loop -----------------------------------------------------------------
    writers = []
    if workdir is not None and lead:
        writers = [JsonlWriter(workdir / "metrics.jsonl"), TensorBoardWriter(workdir / "tb")]
    history: list[dict] = []
    if workdir is not None and (workdir / "metrics.jsonl").exists():
        history = read_metrics(workdir / "metrics.jsonl")  # trimmed to start_step on resume
    bar = ProgressBar(steps, start_step, enabled=progress and lead)
    if isinstance(data, Mapping):
        batches = batches_from(start_step)
    else:
        batches = _checked(batches_from(start_step), spec)
    if on_cpu and data_sharding is None:
        prefetch = 0
    batches = prefetch_to_device(batches, prefetch, put=put)
    for hook in hooks:
        hook.on_fit_start(state, start_step)
    # XLA's CPU client can deadlock in a collective when several steps are in flight on
    # many fake devices sharing few cores; there, wait for each step (GPUs/TPUs never do).
    sync_each_step = strategy != "single" and jax.devices()[0].platform == "cpu"
    t_last, s_last = time.perf_counter(), start_step
    step = start_step
    try:
        if ckpt is not None:
            ckpt.install_signal_handlers()
        out, logged_step = None, start_step

        def log(step, out, do_eval, batch, do_diag=False):
            nonlocal t_last, s_last, logged_step
            fetched = parallel.to_host(out)
            record = {"step": step, **{k: _scalar(v) for k, v in fetched.items()}}
            now = time.perf_counter()
            record["steps_per_sec"] = (step - s_last) / max(now - t_last, 1e-9)
            t_last, s_last, logged_step = now, step, step
            _check_guard(state, steps_fns, nonfinite, ckpt, workdir)
            watch.check(train_step, state, batch)
            if do_eval:
                record.update(run_eval(state))
            if do_diag:
                # The state after this step's update, on this step's batch.
                diag = parallel.to_host(diagnose_step(state, batch))
                record.update({k: _scalar(v) for k, v in diag.items()})
            history.append(record)
            for w in writers:
                w.write(record)
            bar.show(step, record["loss"])
            for hook in hooks:
                hook.on_log(step, record)
            if ckpt is not None:
                ckpt.on_log(step, state, record, batch_pos=step)

        for step in range(start_step + 1, steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                step -= 1
                bar.print(f"data ran out after step {step}; stopping early")
                break
            state, out = train_step(state, batch)
            if sync_each_step:
                jax.block_until_ready(out["loss"])
            bar.advance(step)
            do_eval = eval_data is not None and (
                step == steps or (eval_every is not None and step % eval_every == 0)
            )
            stop_requested = ckpt is not None and ckpt.stop_requested
            do_diag = diagnose_step is not None and step % diagnose_every == 0
            if step % log_every == 0 or step == steps or do_eval or stop_requested or do_diag:
                log(step, out, do_eval, batch, do_diag)
            if ckpt is not None and (
                (checkpoint_every and step % checkpoint_every == 0) or ckpt.stop_requested
            ):
                _check_guard(state, steps_fns, nonfinite, ckpt, workdir)  # never save poison
                ckpt.save(step, state, data_position=position(step))
                if ckpt.stop_requested:
                    bar.close()
                    ckpt.exit_after_stop(step)
        if out is not None and logged_step != step:  # the data ran out between log steps
            log(step, out, eval_data is not None, batch)
        if ckpt is not None and step > start_step:
            _check_guard(state, steps_fns, nonfinite, ckpt, workdir)
            ckpt.save(step, state, data_position=position(step), final=True)
    finally:
        bar.close()
        for w in writers:
            w.close()
        if ckpt is not None:
            ckpt.close()
    result = FitResult(parallel.to_host(state.params), state, history, workdir)
    for hook in hooks:
        hook.on_fit_end(result)
    return result


def _debug_strategy(strategy: str, debug: bool, check: bool) -> str:
    if debug and check:
        raise ValueError(
            "debug=True and check=True are exclusive: check first to find the failing step, "
            "then rerun up to that step with debug=True to look at it"
        )
    if jax.process_count() > 1:
        raise ValueError(
            f"{'debug' if debug else 'check'} mode runs on one device of one process; run it "
            "without jax.distributed (one process)"
        )
    if strategy != "single":
        log.warning(
            "%s mode runs on one device: strategy %r ignored",
            "debug" if debug else "check",
            strategy,
        )
    return "single"


def _debug_steps(steps_fns, model, loss, input_key, grad_accum, debug):
    """``(train_step, eval_step)`` of debug mode (eager) or check mode (checkify)."""
    from jax.experimental import checkify

    from jaxmint.debug._modes import checked_train_step, debug_steps, raise_check

    if debug:
        return debug_steps(steps_fns, model, loss, input_key=input_key, grad_accum=grad_accum)
    checked = checked_train_step(steps_fns.train_step)
    checked_eval = jax.jit(checkify.checkify(steps_fns.eval_step, errors=checkify.all_checks))

    def train_step(state, batch):
        error, (state, out) = checked(state, batch)
        raise_check(error, int(state.step))  # a host sync per step, only in check mode
        return state, out

    def eval_step(state, batch, num_valid):
        error, out = checked_eval(state, batch, num_valid)
        raise_check(error, int(state.step), what="the evaluation after step")
        return out

    return train_step, eval_step


class RecompileWatch:
    """Warn when the train step compiles again, naming the argument that changed."""

    def __init__(self):
        self.size = None
        self.signature = None

    @staticmethod
    def _signature(state, batch) -> dict:
        from jaxmint._tree import flat_with_names

        return {
            name: (
                tuple(np.shape(x)),
                str(getattr(x, "dtype", type(x).__name__)),
                bool(getattr(x, "weak_type", False)),
            )
            for name, x in flat_with_names({"state": state, "batch": batch}).items()
        }

    def check(self, fn, state, batch) -> None:
        cache_size = getattr(fn, "_cache_size", None)
        if cache_size is None or batch is None:
            return
        size = cache_size()
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


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def _checked(batches, spec: BatchSpec):
    for i, batch in enumerate(batches):
        spec.check(batch, what=f"batch {i}")
        yield batch


def _check_eval_data(eval_data, spec: BatchSpec) -> None:
    if not isinstance(eval_data, Mapping):
        raise DataError(f"eval_data must be a dict of arrays, got {type(eval_data).__name__}")
    for key, (shape, dtype) in spec.spec.items():
        if key not in eval_data:
            raise DataError(
                f"eval_data has no key {key!r}; the training batches have keys {sorted(spec.spec)}"
            )
        got = np.asarray(eval_data[key])
        if got.shape[1:] != shape[1:] or got.dtype != dtype:
            raise DataError(
                f"eval_data[{key!r}] has per-example shape {got.shape[1:]} and dtype "
                f"{got.dtype}, but training batches have {shape[1:]} and {dtype}"
            )


def _check_guard(state: TrainState, steps_fns, nonfinite: str, ckpt, workdir=None) -> None:
    guard = parallel.to_host(state.guard)
    if nonfinite != "raise" or int(guard["first_bad_step"]) < 0:
        return
    names = ["total", *steps_fns.term_names]
    terms = [n for n, bad in zip(names, guard["bad_terms"], strict=True) if bad]
    groups = [
        g
        for g, bad in zip(steps_fns.param_groups(state.params), guard["bad_groups"], strict=True)
        if bad
    ]
    kept = ""
    if ckpt is not None and ckpt.latest_step() is not None:
        kept = f" The last good checkpoint (step {ckpt.latest_step()}) is kept."
    if workdir is not None and jax.process_index() == 0:
        # For `jaxmint diagnose RUN_DIR --nan`, which replays this step.
        record = {"step": int(guard["first_bad_step"]), "terms": terms, "groups": groups}
        (Path(workdir) / "nonfinite.json").write_text(json.dumps(record) + "\n")
        kept += f" To see where it appeared: jaxmint diagnose {workdir} --nan."
    raise NonFiniteError(
        f"non-finite values at step {int(guard['first_bad_step'])}: loss terms {terms or 'none'}"
        f", gradients of parameter groups {groups or 'none'}. That update was not applied."
        f"{kept} Lower the learning rate, check the inputs, or pass nonfinite='skip' to skip "
        "such steps."
    )


def _check_args(
    steps, batch_size, strategy, nonfinite, grad_accum, log_every, eval_every, checkpoint_every
) -> None:
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("grad_accum", grad_accum),
        ("log_every", log_every),
    ):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite={nonfinite!r} is not one of {NONFINITE}")
    if batch_size % grad_accum:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by grad_accum={grad_accum}; "
            f"choose grad_accum among {[d for d in range(1, batch_size + 1) if not batch_size % d]}"
        )
