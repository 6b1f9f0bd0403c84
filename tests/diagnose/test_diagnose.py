"""Diagnosis: statistics against hand computations, and each flag provoked on a tiny model."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint import losses
from jaxmint.diagnose import activation_stats, build_diagnose_step, diagnose_run, find_flags
from jaxmint.train import build_steps

REPO = Path(__file__).resolve().parents[2]


def codes(records, **kw):
    return {f.code for f in find_flags(records, **kw)}


def run(data, *, model=None, loss=None, opt=None, steps=40, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log_every", 2)
    kw.setdefault("diagnose_every", 2)
    return jaxmint.fit(
        model or jaxmint.models.mlp((16,), 3),
        loss or losses.softmax_cross_entropy(),
        opt or optax.adam(1e-2),
        data,
        steps=steps,
        batch_size=32,
        **kw,
    ).history


def test_term_gradients_match_hand_computation(toy):
    model = jaxmint.models.mlp((8,), 3)
    loss = losses.softmax_cross_entropy() + 0.5 * losses.l2()
    steps = build_steps(model, loss, optax.sgd(0.1))
    batch = {k: v[:32] for k, v in toy.items()}
    state = steps.init(jax.random.PRNGKey(0), batch)
    d = jax.jit(build_diagnose_step(model, loss, optax.sgd(0.1)))(state, batch)

    def ce(p):
        logits = model.apply({"params": p}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def l2(p):
        return 0.5 * 0.5 * sum(jnp.sum(w**2) for w in jax.tree.leaves(p) if w.ndim >= 2)

    g_ce, g_l2 = jax.grad(ce)(state.params), jax.grad(l2)(state.params)
    norm = lambda g: float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))
    assert float(d["diag/grad_norm/ce"]) == pytest.approx(norm(g_ce), rel=1e-4)
    assert float(d["diag/grad_norm/l2"]) == pytest.approx(norm(g_l2), rel=1e-4)
    share = float(d["diag/grad_share/ce"]) + float(d["diag/grad_share/l2"])
    assert share == pytest.approx(1.0, abs=1e-5)
    dot = sum(
        float(jnp.sum(a * b))
        for a, b in zip(jax.tree.leaves(g_ce), jax.tree.leaves(g_l2), strict=True)
    )
    assert float(d["diag/grad_cos/ce|l2"]) == pytest.approx(dot / norm(g_ce) / norm(g_l2), rel=1e-3)
    # SGD: update = -0.1 * grad, so update/param = 0.1 * |grad| / |param| per layer.
    head = state.params["head"]
    total_head = jax.tree.map(lambda a, b: a + b, g_ce["head"], g_l2["head"])
    want = 0.1 * norm(total_head) / norm(head)
    assert float(d["diag/update_ratio/head"]) == pytest.approx(want, rel=1e-4)


def test_activation_stats():
    x = jnp.array([[0.0, 1.0, -1.0], [0.0, 0.5, 0.99]])
    s = activation_stats({"layer": (x,)})
    assert float(s["diag/dead/layer"]) == pytest.approx(1 / 3)  # unit 0 never positive
    assert float(s["diag/saturated/layer"]) == pytest.approx(3 / 6)
    # Unbounded values (a residual stream, a ReLU layer) are not saturation.
    s = activation_stats({"layer": (jnp.array([[0.0, 5.0, -1.0], [0.0, 2.0, 0.99]]),)})
    assert float(s["diag/saturated/layer"]) == 0.0


def test_diagnostics_only_on_their_steps(toy):
    history = run(toy, steps=20, log_every=5, diagnose_every=10)
    with_diag = [r["step"] for r in history if "diag/grad_norm/ce" in r]
    assert with_diag == [10, 20]
    assert [r["step"] for r in history] == [1, 5, 10, 15, 20]


def test_flag_dominant_term(toy):
    history = run(toy, loss=losses.softmax_cross_entropy() + 1e3 * losses.z_loss())
    assert "dominant-term" in codes(history)


def test_weight_decay_is_judged_as_a_regularizer(tmp_path, toy):
    """A regularizer is not a competing term: most of the gradient is no alarm while the
    model learns; it is one when the data loss stalls or the parameters are crushed."""
    records = [
        {
            "step": s,
            "loss": 1.0 - 0.01 * s + 0.01,
            "loss/ce": 1.0 - 0.01 * s,
            "loss/l2": 10.0,
            "weight/l2": 1e-3,
            "diag/grad_share/ce": 0.05,
            "diag/grad_share/l2": 0.95,
            "diag/param_norm/dense0": 3.0,
        }
        for s in range(2, 42, 2)
    ]
    assert "dominant-term" in codes(records)  # the false alarm of judging it as a term
    assert codes(records, regularizers=["l2"]) == set()
    stalled = [{**r, "loss": 1.01, "loss/ce": 1.0} for r in records]
    assert codes(stalled, regularizers=["l2"]) >= {"regularizer-dominant"}

    healthy = losses.softmax_cross_entropy() + 1e-2 * losses.l2()
    run(toy, loss=healthy, steps=60, workdir=tmp_path / "ok")
    assert diagnose_run(tmp_path / "ok", plots=False).flags == []

    crushed = losses.softmax_cross_entropy() + 5.0 * losses.l2()
    run(toy, loss=crushed, steps=60, workdir=tmp_path / "bad")  # regularizers from config.json
    report = diagnose_run(tmp_path / "bad", plots=False)
    assert [f.code for f in report.flags][:1] == ["regularizer-dominant"], report.text
    assert "regularizer 'l2' makes" in report.text and "norm fell to" in report.text
    # The summary says what loss/<name> is: the term before its weight.
    assert "l2 (regularizer)" in report.text and " x 5 = " in report.text


def test_flags_update_ratio_low_and_plateau(toy):
    same_batch = ({k: v[:32] for k, v in toy.items()} for _ in range(60))  # no batch noise
    history = run(same_batch, opt=optax.adam(1e-8), steps=60)
    assert {"update-ratio-low", "plateau-at-start"} <= codes(history)
    assert "update-ratio-high" not in codes(history)


def test_flag_update_ratio_high(toy):
    history = run(toy, opt=optax.adam(2.0), steps=10, log_every=1, diagnose_every=1)
    assert "update-ratio-high" in codes(history)


def test_flag_vanishing_gradient(toy):
    def init(key, x):
        k1, k2 = jax.random.split(key)
        return {
            "params": {
                "a": {"w": jax.random.normal(k1, (5, 3))},
                "b": {"w": jax.random.normal(k2, (5, 3))},
            }
        }

    def apply(v, x, *, train=False, key=None):
        return x @ v["params"]["a"]["w"] + 1e-5 * (x @ v["params"]["b"]["w"])

    assert "vanishing-gradient" in codes(run(toy, model=jaxmint.Model(init, apply)))


def test_flag_exploding_gradient(toy):
    def init(key, x):
        return {"params": {"w": 0.1 * jax.random.normal(key, (5, 1))}}

    def apply(v, x, *, train=False, key=None):
        return x @ v["params"]["w"]

    data = {"x": toy["x"], "y": toy["x"][:, :1] * 2.0}
    history = run(
        data,
        model=jaxmint.Model(init, apply),
        loss=losses.mse(),
        opt=optax.sgd(1.5),
        steps=16,
        log_every=1,
        diagnose_every=4,
    )
    assert "exploding-gradient" in codes(history)


class _Act(nn.Module):
    bias: float = 0.0
    scale: float = 1.0
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(
            16,
            kernel_init=nn.initializers.normal(self.scale),
            bias_init=nn.initializers.constant(self.bias),
        )(x)
        h = nn.relu(h) if self.act == "relu" else jnp.tanh(h)
        self.sow("intermediates", "hidden", h)
        return nn.Dense(3)(h)


def test_flag_dead_units(toy):
    model = jaxmint.models.from_linen(_Act(bias=-50.0))
    assert "dead-units" in codes(run(toy, model=model))


def test_flag_saturated_units(toy):
    model = jaxmint.models.from_linen(_Act(scale=30.0, act="tanh"))
    assert "saturated-units" in codes(run(toy, model=model, opt=optax.adam(1e-4)))


def test_flag_loss_spike(toy):
    def batches():
        for i in range(40):
            x = toy["x"][:32] * (50.0 if i == 30 else 1.0)
            yield {"x": x, "y": toy["y"][:32]}

    history = run(batches(), log_every=1, diagnose_every=10)
    assert "loss-spike" in codes(history)


def test_flag_overfitting():
    rng = np.random.default_rng(0)
    train = {
        "x": rng.normal(size=(32, 20)).astype(np.float32),
        "y": rng.integers(0, 3, 32).astype(np.int32),
    }
    test = {
        "x": rng.normal(size=(64, 20)).astype(np.float32),
        "y": rng.integers(0, 3, 64).astype(np.int32),
    }
    history = run(
        train,
        model=jaxmint.models.mlp((256,), 3),
        opt=optax.adam(1e-2),
        steps=150,
        eval_data=test,
        eval_every=10,
        log_every=10,
        diagnose_every=50,
    )
    assert "overfitting" in codes(history)


def test_healthy_run_has_no_flags(toy):
    assert codes(run(toy, steps=60)) == set()


def test_report_writes_text_and_plots(tmp_path, toy):
    run(toy, workdir=tmp_path / "run", loss=losses.softmax_cross_entropy() + 1e3 * losses.z_loss())
    report = diagnose_run(tmp_path / "run")
    assert "dominant-term" in report.text
    names = {p.name for p in report.plots}
    assert {"losses.png", "grad_share.png", "update_ratio.png"} <= names
    assert (tmp_path / "run/diagnosis/report.txt").read_text().startswith("diagnosis of")


def test_cli_plot_and_lr_find(tmp_path, toy):
    from jaxmint.cli import main

    run(toy, workdir=tmp_path / "a", steps=10)
    run(toy, workdir=tmp_path / "b", steps=10, opt=optax.adam(1e-3))
    out = tmp_path / "cmp.png"
    assert (
        main(
            [
                "plot",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--metric",
                "loss",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.stat().st_size > 1000
    png = tmp_path / "lr.png"
    assert (
        main(
            [
                "lr-find",
                str(REPO / "experiments/digits_mlp.py"),
                "--steps",
                "40",
                "--out",
                str(png),
                "--",
                "--hidden",
                "16",
            ]
        )
        == 0
    )
    assert png.stat().st_size > 1000


NAN_EXPERIMENT = """
import dataclasses
import numpy as np
import optax
import jaxmint
from jaxmint.config import field
from jaxmint.experiment import Common, Experiment

@dataclasses.dataclass
class Config(Common):
    workdir: str = field("run", "run dir")
    steps: int = field(12, "steps")
    batch_size: int = field(32, "batch")
    checkpoint_every: int = field(4, "ckpt")
    eval_every: int = field(100, "eval")
    log_every: int = field(1, "log")

def build(config):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)).astype(np.float32)
    y = rng.integers(0, 3, 96).astype(np.int32)
    x[70, 2] = 3e38  # overflows to inf in the first layer once its batch comes
    return Experiment(jaxmint.models.mlp((8,), 3), jaxmint.losses.softmax_cross_entropy(),
                      optax.sgd(0.01), {"x": x, "y": y})

if __name__ == "__main__":
    jaxmint.experiment.main(build, Config)
"""


def test_nan_localization_replays_the_failing_step(tmp_path):
    script = tmp_path / "nan_exp.py"
    script.write_text(textwrap.dedent(NAN_EXPERIMENT))
    out = subprocess.run(
        [sys.executable, str(script), "--workdir", str(tmp_path / "run"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "non-finite values at step" in out.stderr
    record = json.loads((tmp_path / "run/nonfinite.json").read_text())
    from jaxmint.diagnose import localize_nonfinite

    text = localize_nonfinite(tmp_path / "run")
    assert f"replayed step {record['step']}" in text
    # The gradient is finite but huge: its square overflows in the guard's norm.
    assert "comes from: square overflowed to inf (its input reached" in text, text
    assert "in _sum_squares" in text
    assert "checkify found no" not in text


MASKED_NAN_EXPERIMENT = """
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import optax
import jaxmint
from jaxmint.config import field
from jaxmint.experiment import Common, Experiment
from jaxmint.models._zoo import portable_attention

@dataclasses.dataclass
class Config(Common):
    workdir: str = field("run", "run dir")
    steps: int = field(6, "steps")
    batch_size: int = field(8, "batch")
    checkpoint_every: int = field(2, "ckpt")
    eval_every: int = field(100, "eval")
    log_every: int = field(1, "log")
    shipped: bool = field(False, "the shipped attention instead of ALiBi")

def alibi_window(q, k, v, *, is_causal):
    # ALiBi and a sliding window: the masked scores are an intentional -inf.
    length, heads = q.shape[1], q.shape[2]
    pos = jnp.arange(length)
    distance = pos[:, None] - pos[None, :]
    slopes = 2.0 ** (-jnp.arange(1, heads + 1))
    scores = jnp.einsum("blhd,bshd->bhls", q, k) / jnp.sqrt(q.shape[-1])
    scores = scores - slopes[:, None, None] * distance
    allowed = (distance >= 0) & (distance < 4)
    scores = jnp.where(allowed, scores, -jnp.inf)
    return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(scores, axis=-1), v)

def penalty(outputs, batch):
    nll = -jnp.take_along_axis(jax.nn.log_softmax(outputs), batch["y"][..., None], -1)
    nll = nll[..., 0].mean(-1)
    return -jnp.log(nll - 10.0)  # THE BUG: nll is ~3.5, so this is log of a negative

def build(config):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (64, 17)).astype(np.int32)
    attention = portable_attention if config.shipped else alibi_window
    model = jaxmint.models.transformer(32, max_len=16, d_model=16, num_heads=2,
                                       num_layers=1, attention=attention)
    loss = jaxmint.losses.softmax_cross_entropy() + 0.1 * jaxmint.losses.term(penalty, name="p")
    return Experiment(model, loss, optax.adam(1e-3), {"x": tokens[:, :-1], "y": tokens[:, 1:]})

if __name__ == "__main__":
    jaxmint.experiment.main(build, Config)
"""


@pytest.mark.slow
@pytest.mark.parametrize("shipped", [False, True])
def test_nan_report_names_the_fault_not_the_attention_mask(tmp_path, shipped, monkeypatch):
    """A -inf mask that the softmax turns into zeros never reaches the loss."""
    from jaxmint.diagnose import localize_nonfinite
    from jaxmint.run import load_module

    script = tmp_path / "alibi_nan.py"
    script.write_text(textwrap.dedent(MASKED_NAN_EXPERIMENT))
    run_dir = tmp_path / "run"
    args = ["--workdir", str(run_dir), "--no-progress"] + (["--shipped"] if shipped else [])
    module = load_module(script)
    monkeypatch.setitem(sys.modules, "__main__", module)  # as `python alibi_nan.py` records
    with pytest.raises(SystemExit) as e:
        jaxmint.experiment.main(module.build, module.Config, args)
    assert "non-finite values at step" in str(e.value.code)

    text = localize_nonfinite(run_dir)
    bug = (
        textwrap.dedent(MASKED_NAN_EXPERIMENT)
        .splitlines()
        .index(
            "    return -jnp.log(nll - 10.0)  # THE BUG: nll is ~3.5, so this is log of a negative"
        )
    )
    assert f"comes from: log made nan at alibi_nan.py:{bug + 1} in penalty" in text, text
    assert "alibi_window" not in text and "portable_attention" not in text


def test_recompile_watch_names_the_changed_argument(caplog):
    import logging

    from jaxmint.train._builtin import RecompileWatch

    f = jax.jit(lambda state, batch: state["w"] * batch["x"].sum())
    state = {"w": jnp.ones(3)}
    watch = RecompileWatch()
    batch = {"x": np.ones((4, 3), np.float32)}
    f(state, batch)
    watch.check(f, state, batch)
    f(state, batch)
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        watch.check(f, state, batch)
        assert "compiled again" not in caplog.text
        wider = {"x": np.ones((4, 5), np.float32)}
        f(state, wider)
        watch.check(f, state, wider)
    assert "compiled again (2 versions)" in caplog.text
    assert "batch/x: ((4, 3), 'float32', False) -> ((4, 5), 'float32', False)" in caplog.text


def test_planted_failures_on_digits_and_the_docs_table_of_them():
    """lr 1e6, 3.0 and 1e-7, a crushing weight decay and a drowning auxiliary term, each
    trained on digits: the report leads with the cause; a healthy run with weight decay
    raises nothing. docs/diagnosis.md's table is these very results."""
    spec = importlib.util.spec_from_file_location(
        "gen_diagnosis_table", REPO / "scripts/gen_diagnosis_table.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    found = gen.results()
    codes = {what: [f.code for f in flags] for what, flags in found.items()}
    for lr in ("1e6", "3.0"):
        flags = found[f"Adam at learning rate {lr}"]
        assert codes[f"Adam at learning rate {lr}"][0] == "diverging"
        assert "jaxmint lr-find" in flags[0].sentence and "too high" in flags[0].sentence
        assert all(f.consequence for f in flags[1:])  # dead units etc. follow from it
    assert "exploding-gradient" in codes["Adam at learning rate 1e6"]
    assert codes["Adam at learning rate 1e-7"][0] == "update-ratio-low"
    assert "plateau-at-start" in codes["Adam at learning rate 1e-7"]
    assert codes["weight decay (L2) weighted 5.0"][:1] == ["regularizer-dominant"]
    assert codes["an auxiliary z-loss weighted 1e3"][:1] == ["dominant-term"]
    assert codes["none: Adam at 1e-3 with weight decay 1e-4"] == []
    assert gen.main(["--check"], found) == 0, "run python scripts/gen_diagnosis_table.py"


def test_nonfinite_origin_names_the_line_and_the_module_path():
    from jaxmint.diagnose._flow import nonfinite_origins

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x)
            masked = jnp.where(h > 0, h, -jnp.inf)  # an intentional -inf, then made finite
            h = h + jax.nn.softmax(jnp.stack([masked, h]), axis=0)[0]
            return jnp.log(h - 100.0)  # the fault

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Block(name="block0")(x).sum()

    net = Net()
    variables = net.init(jax.random.PRNGKey(0), jnp.ones((2, 3)))
    step = jax.value_and_grad(lambda v: net.apply(v, jnp.ones((2, 3))))
    origins = nonfinite_origins(step, variables)
    line = (
        Path(__file__)
        .read_text()
        .splitlines()
        .index("            return jnp.log(h - 100.0)  # the fault")
    )
    sentence = origins[0].sentence()
    assert sentence.startswith(f"log made nan at test_diagnose.py:{line + 1} in "), sentence
    assert sentence.endswith("Block.__call__, in Net/block0"), sentence
    assert all(o.primitive != "select_n" for o in origins)  # the mask is never blamed
