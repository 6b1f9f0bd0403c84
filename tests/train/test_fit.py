"""fit and the pure steps: learning, trace counts, equivalences, logs, hooks, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint import losses
from jaxmint.data import DataError
from jaxmint.train import NonFiniteError, build_steps


def _fit(data, **kw):
    kw.setdefault("progress", False)
    model = kw.pop("model", jaxmint.models.mlp((32,), num_outputs=3))
    loss = kw.pop("loss", losses.softmax_cross_entropy())
    opt = kw.pop("optimizer", optax.adam(1e-2))
    return jaxmint.fit(model, loss, opt, data, **kw)


def test_train_step_compiles_once_across_steps_and_changing_weights(toy):
    traces = []

    def counted(out, batch):
        traces.append(1)
        return jnp.zeros(out.shape[0])

    loss = losses.softmax_cross_entropy() + optax.linear_schedule(0.0, 1.0, 5) * losses.term(
        counted, name="c"
    )
    steps = build_steps(jaxmint.models.mlp((8,), 3), loss, optax.sgd(0.1))
    batch = {k: v[:16] for k, v in toy.items()}
    state = steps.init(jax.random.PRNGKey(0), batch)
    step = jax.jit(steps.train_step, donate_argnums=0)
    for _ in range(8):
        state, metrics = step(state, batch)
    assert len(traces) == 1
    assert step._cache_size() == 1
    assert int(state.step) == 8
    assert float(metrics["weight/c"]) == pytest.approx(1.0)


def test_fit_learns_and_writes_run_dir(tmp_path, toy):
    calls = []
    result = _fit(
        toy,
        steps=60,
        batch_size=32,
        workdir=tmp_path / "run",
        eval_data=toy,
        eval_every=30,
        log_every=20,
        metrics={"accuracy": jaxmint.metrics.accuracy()},
        hooks=[lambda step, record: calls.append(step)],
        config={"name": "toy"},
    )
    assert result.final_eval["eval/accuracy"] > 0.9
    assert calls == [1, 20, 30, 40, 60]  # the first step is always logged
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    assert [r["step"] for r in lines] == calls
    assert {"loss", "loss/ce", "accuracy", "grad_norm", "steps_per_sec"} <= set(lines[0])
    assert "eval/accuracy" in lines[2] and "eval/accuracy" not in lines[1]
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["config"] == {"name": "toy"} and config["fit"]["steps"] == 60
    assert list((tmp_path / "run/tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "run/checkpoints/60").is_dir()


def test_fit_on_an_iterable_of_batches(toy):
    def batches():
        for i in range(100):
            j = (i * 16) % 96
            yield {k: v[j : j + 16] for k, v in toy.items()}

    result = _fit(batches(), steps=30, batch_size=16, log_every=10)
    assert [r["step"] for r in result.history] == [1, 10, 20, 30]


def test_grad_accum_matches_one_big_batch(toy):
    kw = dict(steps=5, batch_size=32, optimizer=optax.sgd(0.5), log_every=5)
    a = _fit(toy, **kw)
    b = _fit(toy, grad_accum=4, **kw)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.params, b.params
    )


def test_grad_accum_threads_batch_stats(digits):
    train = {"x": digits[0]["x"][:128].reshape(-1, 8, 8, 1), "y": digits[0]["y"][:128]}
    result = _fit(
        train, model=jaxmint.models.cnn((4,), 10), steps=3, batch_size=32, grad_accum=2, log_every=3
    )
    stats = jax.device_get(result.state.model_state["batch_stats"])
    assert float(np.abs(stats["bn0"]["mean"]).sum()) > 0


def test_bfloat16_compute_keeps_float32_params(toy):
    result = _fit(
        toy,
        steps=40,
        batch_size=32,
        compute_dtype="bfloat16",
        eval_data=toy,
        metrics={"accuracy": jaxmint.metrics.accuracy()},
    )
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(result.params))
    assert result.final_eval["eval/accuracy"] > 0.8


def test_eval_pads_last_batch_and_weighs_examples(toy):
    result = _fit(
        toy,
        steps=1,
        batch_size=32,
        eval_data={k: v[:50] for k, v in toy.items()},
        metrics={"accuracy": jaxmint.metrics.accuracy()},
    )
    model = jaxmint.models.mlp((32,), num_outputs=3)
    logits = model.apply({"params": result.params}, toy["x"][:50])
    want = float((np.argmax(logits, -1) == toy["y"][:50]).mean())
    assert result.final_eval["eval/accuracy"] == pytest.approx(want, abs=1e-6)


def _nan_loss():
    def nan_after_2(out, batch):
        return jnp.zeros(out.shape[0])

    ce = losses.softmax_cross_entropy()
    bad = losses.term(
        lambda out, b: jnp.where(b["x"][:, 0] > 100, jnp.nan, 0.0) + 0 * out[:, 0], name="trap"
    )
    return ce + bad


def test_nonfinite_raise_names_step_and_term(toy):
    data = dict(toy)
    data["x"] = data["x"].copy()
    data["x"][5, 0] = 1000.0  # a poisoned example
    with pytest.raises(NonFiniteError, match=r"step \d+: loss terms \['total', 'trap'\]"):
        _fit(data, loss=_nan_loss(), steps=20, batch_size=32, log_every=5)


def test_nonfinite_skip_leaves_state_unchanged_and_counts(toy):
    data = dict(toy)
    data["x"] = data["x"].copy()
    data["x"][5, 0] = 1000.0
    result = _fit(data, loss=_nan_loss(), steps=9, batch_size=32, nonfinite="skip", log_every=9)
    assert result.history[-1]["skipped_steps"] == 3  # one poisoned batch per 3-batch epoch
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(result.params))


def test_nonfinite_gradient_names_parameter_group(toy):
    def init(key, x):
        return {"params": {"a": {"w": jnp.ones((5, 3))}, "b": {"w": jnp.ones((5, 3))}}}

    def apply(v, x, *, train=False, key=None):
        return x @ v["params"]["a"]["w"] + jnp.sqrt(v["params"]["b"]["w"] - 1.0).sum() * 0

    model = jaxmint.Model(init, apply)
    with pytest.raises(NonFiniteError, match=r"parameter groups \['b'\]"):
        _fit(toy, model=model, steps=2, batch_size=32, log_every=1)


def test_error_missing_input_key(toy):
    with pytest.raises(DataError, match=r"no key 'image'.*\['x', 'y'\]"):
        _fit(toy, steps=1, batch_size=8, input_key="image")


def test_error_eval_data_shape(toy):
    bad = {"x": np.zeros((10, 4), np.float32), "y": np.zeros((10,), np.int32)}
    with pytest.raises(DataError, match=r"eval_data\['x'\] has per-example shape \(4,\)"):
        _fit(toy, steps=1, batch_size=8, eval_data=bad)


def test_error_iterable_batch_changes_shape(toy):
    def batches():
        yield {k: v[:16] for k, v in toy.items()}
        yield {k: v[:16] for k, v in toy.items()}
        yield {"x": toy["x"][:16, :4], "y": toy["y"][:16]}

    with pytest.raises(DataError, match=r"batch 2\['x'\] has shape \(16, 4\).*\(16, 5\)"):
        _fit(batches(), steps=5, batch_size=16)


def test_error_batch_size_and_args(toy):
    with pytest.raises(DataError, match="larger than the dataset"):
        _fit(toy, steps=1, batch_size=1000)
    with pytest.raises(ValueError, match=r"not divisible by grad_accum=5; choose grad_accum"):
        _fit(toy, steps=1, batch_size=32, grad_accum=5)
    with pytest.raises(ValueError, match="strategy"):
        _fit(toy, steps=1, batch_size=32, strategy="magic")
    with pytest.raises(ValueError, match="nonfinite"):
        _fit(toy, steps=1, batch_size=32, nonfinite="ignore")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        _fit(toy, steps=0, batch_size=32)


def test_error_loss_term_shape_before_compiling(toy):
    bad = losses.term(lambda out, b: out, name="whole")  # fine: (B, C)
    worse = losses.term(lambda out, b: out.sum(), name="summed")
    _fit(toy, loss=bad, steps=1, batch_size=8)
    with pytest.raises(losses.LossError, match="'summed' must return per-example values"):
        _fit(toy, loss=worse, steps=1, batch_size=8)


def test_learnable_loss_weights_are_trained(toy):
    loss = losses.uncertainty_weighted(losses.softmax_cross_entropy(), losses.z_loss())
    result = _fit(toy, loss=loss, steps=20, batch_size=32, log_every=20)
    (log_var,) = jax.device_get(result.state.loss_state["params"]).values()
    assert np.all(log_var != 0.0)
    assert "weight/ce" in result.history[-1]


def test_iterable_that_runs_out_still_logs_and_evaluates(toy):
    batches = ({k: v[:32] for k, v in toy.items()} for _ in range(7))
    result = _fit(
        batches,
        steps=50,
        batch_size=32,
        log_every=5,
        eval_data=toy,
        metrics={"accuracy": jaxmint.metrics.accuracy()},
    )
    assert result.history[-1]["step"] == 7
    assert "eval/accuracy" in result.final_eval


def test_single_array_as_data_is_explained(toy):
    with pytest.raises(DataError, match=r"single array of shape \(96, 5\); pass a dict"):
        _fit(toy["x"], steps=1, batch_size=8)


def test_hooks_of_the_first_protocol_keep_working(toy):
    seen = []

    class Old(jaxmint.Hook):
        def on_fit_start(self, state, start_step):
            seen.append(("start", start_step))

        def on_log(self, step, record):
            seen.append(("log", step, "loss" in record))

        def on_fit_end(self, result):
            seen.append(("end", result.history[-1]["step"]))

    _fit(toy, steps=4, batch_size=16, log_every=2, hooks=[Old()])
    assert seen == [("start", 0), ("log", 1, True), ("log", 2, True), ("log", 4, True), ("end", 4)]


def test_builtin_hooks_can_be_replaced_and_removed(tmp_path, toy):
    from jaxmint.train import Checkpointer, Progress, RecompileWatch, without

    class QuietProgress(Progress):
        def __init__(self):
            super().__init__(enabled=False)
            self.shown = []

        def on_log(self, loop, step, state, batch, record):
            self.shown.append(step)

    seen = {}

    class Spy(jaxmint.Hook):
        def on_start(self, loop, state):
            seen["hooks"] = [type(h).__name__ for h in loop.hooks]

    mine = QuietProgress()
    _fit(toy, steps=4, batch_size=16, log_every=2, hooks=[Spy(), mine])
    assert mine.shown == [1, 2, 4]
    assert seen["hooks"] == ["NonFiniteGuard", "RecompileWatch", "Spy", "QuietProgress"]
    _fit(
        toy,
        steps=4,
        batch_size=16,
        workdir=tmp_path,
        hooks=[Spy(), without(RecompileWatch, Progress, Checkpointer)],
    )
    assert seen["hooks"] == ["NonFiniteGuard", "Spy", "Writers"]
    assert not (tmp_path / "checkpoints").exists()  # no checkpointer, no checkpoints
    with pytest.raises(TypeError, match="hook classes"):
        without("progress")


def test_a_model_seen_before_is_initialized_without_compiling_again(toy, monkeypatch):
    """Sweeps and tests run many short fits: the init compiles once per program."""
    from jaxmint.train import _compiled

    compiles = []
    real = jax.stages.Lowered.compile
    monkeypatch.setattr(
        jax.stages.Lowered, "compile", lambda self, *a, **k: compiles.append(1) or real(self)
    )
    _compiled.clear()
    first = _fit(toy, steps=1, batch_size=16, seed=3)
    again = _fit(toy, steps=1, batch_size=16, seed=3)
    other_seed = _fit(toy, steps=1, batch_size=16, seed=4)  # the seed is an argument
    assert len(compiles) == 1
    wider = _fit(toy, steps=1, batch_size=16, model=jaxmint.models.mlp((33,), num_outputs=3))
    assert len(compiles) == 2 and wider.params["dense0"]["kernel"].shape[-1] == 33
    jax.tree.map(np.testing.assert_array_equal, first.params, again.params)
    assert not np.array_equal(
        first.params["dense0"]["kernel"], other_seed.params["dense0"]["kernel"]
    )

    # The same values as a plain jax.jit of the init.
    steps = build_steps(
        jaxmint.models.mlp((32,), num_outputs=3), losses.softmax_cross_entropy(), optax.adam(1e-2)
    )
    batch = {k: v[:16] for k, v in toy.items()}
    plain = jax.jit(steps.init)(jax.random.PRNGKey(3), batch)
    cached = _compiled.call_compiled(steps.init, jax.random.PRNGKey(3), batch)
    assert len(compiles) == 2
    jax.tree.map(np.testing.assert_array_equal, plain.params, cached.params)


def test_replay_settings_are_checked_before_anything_runs(toy, tmp_path):
    from jaxmint.run import RunDirError

    with pytest.raises(ValueError, match="replay_from needs stop_after: the step"):
        _fit(toy, steps=2, batch_size=16, replay_from="elsewhere", workdir=tmp_path / "a")
    with pytest.raises(ValueError, match="a workdir of its own"):
        _fit(toy, steps=2, batch_size=16, replay_from="elsewhere", stop_after=1)
    with pytest.raises(ValueError, match="stop_after=5 is past steps=2"):
        _fit(toy, steps=2, batch_size=16, stop_after=5)
    with pytest.raises(ValueError, match="this run's own workdir"):
        _fit(
            toy,
            steps=2,
            batch_size=16,
            stop_after=1,
            replay_from=tmp_path / "a",
            workdir=tmp_path / "a",
        )
    with pytest.raises(RunDirError, match="not a run dir"):
        _fit(
            toy,
            steps=2,
            batch_size=16,
            stop_after=1,
            replay_from=tmp_path / "no",
            workdir=tmp_path / "b",
        )
    result = _fit(toy, steps=8, batch_size=16, stop_after=3)  # schedules see 8; it stops at 3
    assert [r["step"] for r in result.history] == [1, 3]


def test_token_ids_outside_the_vocabulary_are_refused_before_compiling():
    """JAX clamps an out-of-range gather: without a check, training goes on in silence."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (16, 9)).astype(np.int32)
    tokens[3, 4] = 40
    data = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    model = jaxmint.models.transformer(32, max_len=8, d_model=16, num_heads=2, num_layers=1)
    assert model.input_range == (0, 32)
    with pytest.raises(DataError, match=r"training data holds model inputs outside \[0, 32\)"):
        _fit(data, model=model, steps=1, batch_size=8)
    clean = {"x": np.minimum(data["x"], 31), "y": data["y"]}
    with pytest.raises(DataError, match=r"eval_data holds model inputs outside.*max 40"):
        _fit(clean, model=model, steps=1, batch_size=8, eval_data={**clean, "x": data["x"]})


def test_settings_come_in_groups_that_fitconfig_and_experiments_build_on():
    import dataclasses

    from jaxmint.experiment import Common
    from jaxmint.train import (
        CheckpointSettings,
        DebugSettings,
        EvaluationSettings,
        FitConfig,
        LoggingSettings,
        TrainingSettings,
    )

    groups = (
        TrainingSettings,
        EvaluationSettings,
        CheckpointSettings,
        LoggingSettings,
        DebugSettings,
    )
    names = [f.name for g in groups for f in dataclasses.fields(g)]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(FitConfig))
    assert len(names) == len(set(names))  # each setting in exactly one group
    config = Common(keep_last=5, steps=7)
    assert all(isinstance(config, g) for g in groups)
    assert config.part(CheckpointSettings) == CheckpointSettings(
        workdir=config.workdir, checkpoint_every=config.checkpoint_every, keep_last=5
    )
    assert config.part(TrainingSettings).steps == 7
