"""Before `fit`'s first step: the layout and the data, the inputs checked, the state
initialized, the steps compiled, and the run dir opened (resumed, or started and
recorded); and the evaluation of a state on eval data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import numpy as np

from jaxmint.config import normalized, run_control_fields
from jaxmint.data import DataError, TrainData, check_input_range, eval_batches
from jaxmint.models import split_variables
from jaxmint.run import RunDir
from jaxmint.state import TrainState
from jaxmint.steps import build_steps
from jaxmint.train import _modes
from jaxmint.train import _parallel as parallel
from jaxmint.train._compiled import call_compiled, use_persistent_cache
from jaxmint.train._config import FIT_FIELDS, FitConfig
from jaxmint.train._resume import resume

if TYPE_CHECKING:
    from jaxmint.train._fit import FitLoop


def prepare(loop: FitLoop, data, metrics) -> None:
    """The strategy and mesh, the training data (checked), and the pure steps."""
    s = loop.settings
    if s.compile_cache is not None:
        use_persistent_cache(s.compile_cache)
    loop.strategy = "mesh" if s.mesh is not None else parallel.resolve(s.strategy)
    if s.debug or s.check:
        loop.strategy = _modes.single_device(loop.strategy, "debug" if s.debug else "check")
    loop.mesh = parallel.layout(loop.strategy, s.mesh)
    parallel.check_batch(s.batch_size, s.grad_accum, loop.strategy, loop.mesh)
    loop.n_proc, loop.proc = jax.process_count(), jax.process_index()
    loop.lead = loop.proc == 0  # only the first process writes files and draws the bar
    loop.data = TrainData(
        data, s.batch_size, seed=s.seed, shard=(loop.proc, loop.n_proc), workers=s.data_workers
    )
    check_inputs(loop)
    loop.steps = build_steps(
        loop.model,
        loop.loss,
        loop.optimizer,
        input_key=loop.input_key,
        metrics=metrics,
        grad_accum=s.grad_accum,
        compute_dtype=s.compute_dtype,
        axis_name=parallel.AXIS if loop.strategy == "pmap" else None,
    )
    loop.on_cpu = jax.devices()[0].platform == "cpu"


def evaluate(loop: FitLoop, state: TrainState, eval_data) -> dict:
    """``eval/<name>`` means over all of ``eval_data`` for ``state``: padded batches of
    ``eval_batch_size`` (rounded up to the devices), each process its share."""
    n_dev = jax.device_count()
    size = loop.settings.eval_batch_size or loop.settings.batch_size
    size = -(-size // n_dev) * n_dev  # divisible by the devices
    per = size // loop.n_proc
    sums: dict[str, float] = {}
    count = 0
    for batch, n in eval_batches(eval_data, size):
        local = {k: v[loop.proc * per : (loop.proc + 1) * per] for k, v in batch.items()}
        out = parallel.to_host(loop.eval_step(state, loop.put(local), np.int32(n)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        count += n
    return {f"eval/{k}": v / count for k, v in sums.items() if not k.startswith("weight/")}


def check_inputs(loop: FitLoop) -> None:
    s, first = loop.settings, loop.data.first
    loop.data.spec.require([loop.input_key], "the model's input, input_key")
    got = np.shape(first[loop.input_key])[0]
    local = s.batch_size // loop.n_proc
    if got != local:
        raise DataError(
            f"the first batch has {got} examples but batch_size={s.batch_size}"
            + (f" over {loop.n_proc} processes ({local} each)" if loop.n_proc > 1 else "")
            + "; an iterable must yield batches of that size"
        )
    if loop.eval_data is not None:
        loop.data.check_eval(loop.eval_data)
    bounds = getattr(loop.model, "input_range", None)
    if bounds is not None:
        check_input_range(loop.data.whole_or_first(loop.input_key), bounds, "the training data")
        if isinstance(loop.eval_data, Mapping) and loop.input_key in loop.eval_data:
            check_input_range(loop.eval_data[loop.input_key], bounds, "eval_data")


def init_state(loop: FitLoop) -> TrainState:
    first = loop.data.first
    key = jax.random.PRNGKey(loop.settings.seed)
    # Every process initializes from the same (data-independent) sample, so params agree.
    sample = first if loop.n_proc == 1 else {k: np.zeros_like(v[:1]) for k, v in first.items()}
    loop.shardings = loop.data_sharding = None
    if loop.settings.debug:
        with jax.disable_jit():
            return loop.steps.init(key, sample)
    if loop.strategy == "single":
        return call_compiled(loop.steps.init, key, sample)
    abstract = jax.eval_shape(loop.steps.init, key, sample)
    names = param_axes(loop.model, key, sample[loop.input_key])
    loop.shardings = parallel.state_shardings(abstract, loop.mesh, loop.strategy, names, loop.rules)
    loop.data_sharding = parallel.batch_sharding(loop.mesh)
    return call_compiled(loop.steps.init, key, sample, out_shardings=loop.shardings)


def param_axes(model, key, inputs) -> dict[str, tuple]:
    """The logical axis names of the model's parameters, keyed like ``state.params``."""
    if model.logical_axes is None:
        return {}
    names = model.logical_axes(key, inputs)
    prefix = "['params']"
    if any(k.startswith(prefix) for k in names):  # flax variables: the params collection
        return {k[len(prefix) :]: v for k, v in names.items() if k.startswith(prefix)}
    return names


def compile_steps(loop: FitLoop, state: TrainState) -> None:
    s = loop.settings
    if s.debug:
        loop.train_step, loop.eval_step = _modes.debug_steps(
            loop.steps, loop.model, loop.loss, input_key=loop.input_key, grad_accum=s.grad_accum
        )
        return  # a debug run compiles nothing; its first step shows any error itself
    if s.check:
        loop.train_step, loop.eval_step = _modes.checked_steps(loop.steps)
    else:
        loop.train_step, loop.eval_step = parallel.compile_steps(
            loop.steps, loop.strategy, loop.mesh, loop.shardings, loop.rules
        )
    # Trace once on shapes: a bad loss term or batch fails here, before compiling.
    shapes = {
        k: jax.ShapeDtypeStruct(
            (s.batch_size, *np.shape(v)[1:]), np.asarray(v).dtype, sharding=loop.data_sharding
        )
        for k, v in loop.data.first.items()
    }
    jax.eval_shape(loop.steps.train_step if s.check else loop.train_step, state, shapes)


def open_run(loop: FitLoop, state: TrainState, config) -> TrainState:
    """Resume from the run dir's newest checkpoint (or start it), then record the run."""
    s, run = loop.settings, loop.run_dir
    run.create()
    if s.fresh:
        run.move_aside()
    if s.replay_from is not None:
        seed_replay(loop, RunDir.of(s.replay_from), loop.replay_before)
    if s.debug or run.recorded_debug():
        run.check_kind(s.debug, fresh=s.fresh)
    loop.checkpoints = run.checkpoints(
        keep_last=s.keep_last,
        keep_best=s.keep_best,
        best_mode=s.best_mode,
        scores=run.scores(s.best_metric),
    )
    record = run_record(loop, config)
    state, loop.start_step = resume(loop, state, record)
    run.trim_metrics(loop.start_step)
    loop.history = run.metrics()
    run.mark_debug(s.debug)
    if loop.lead:
        run.write_config(record)
    return state


def seed_replay(loop: FitLoop, source: RunDir, before: list[int]) -> None:
    """Copy ``source``'s newest checkpoint ``before`` the step to replay into this run
    dir (only read there), so that the run resumes from it with today's config."""
    s, run = loop.settings, loop.run_dir
    if run.checkpoint_steps():
        return  # already seeded: resume from this dir's own checkpoints
    if before:
        run.copy_checkpoint(source, before[-1])
    if loop.lead:
        start = f"its checkpoint at step {before[-1]}" if before else "the start"
        print(f"replaying {source.path} from {start} to step {s.stop_after}", flush=True)


def run_record(loop: FitLoop, config) -> dict:
    if config is None:
        recorded, control = {}, set()
    elif dataclasses.is_dataclass(config):
        recorded, control = dataclasses.asdict(config), run_control_fields(type(config))
    else:
        recorded, control = dict(config), set()
    return {
        "config": normalized(recorded),
        "fit": loop.settings.record()
        | {
            "strategy": loop.strategy,
            "mesh_shape": None if loop.mesh is None else dict(loop.mesh.shape),
        },
        "run_control": sorted(control | {f for f in FIT_FIELDS if _is_control(f)}),
        "loss": {
            "terms": loop.loss.term_names,
            "regularizers": loop.loss.regularizer_names,
        },
        "versions": {"jax": jax.__version__},
        "debug": loop.settings.debug,
    }


def replay_steps(s: FitConfig, workdir) -> list[int]:
    """The steps of ``replay_from`` before ``stop_after``, checked before anything runs."""
    if workdir is None:
        raise ValueError("replay_from needs a workdir of its own to write the replay in")
    source = RunDir.of(s.replay_from)
    if source.path.resolve() == RunDir.of(workdir).path.resolve():
        raise ValueError(f"replay_from={s.replay_from!r} is this run's own workdir")
    return [k for k in source.require_checkpoint_steps() if k < s.stop_after]


def _is_control(name: str) -> bool:
    return next(f for f in dataclasses.fields(FitConfig) if f.name == name).metadata.get(
        "run_control", False
    )


def plan_sharding(model, sample_input, mesh=None, *, strategy: str = "auto", rules=None):
    """``(mesh axes, rows)``: how ``model``'s parameters would lie on ``mesh`` (a spec such as
    ``"data=2,fsdp=2,tensor=2"``; default: the ``strategy``'s mesh), planned from their
    shapes without the devices; one row per parameter (see `parallel.sharding_plan`)."""
    spec = mesh
    if spec is None and parallel.resolve(strategy) in parallel.SHORTHANDS:
        spec = parallel.SHORTHANDS[parallel.resolve(strategy)]
    axes = parallel.parse_mesh(spec) if spec else {"data": 1}
    if any(v == -1 for v in axes.values()):
        raise parallel.MeshError(
            f"mesh {parallel.mesh_text(axes)} has a -1 axis, which takes the devices there "
            "are; plan a mesh with every size given, e.g. data=2,fsdp=2,tensor=2"
        )
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(model.init, key, sample_input)
    params, _ = split_variables(variables)
    names = param_axes(model, key, sample_input)
    return axes, parallel.sharding_plan(params, names, axes, rules)
