"""Loss state is keyed by name: a resumed run trains the loss as the code writes it."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint import losses
from jaxmint.data import TrainData
from jaxmint.losses import LossError, LossInputs
from jaxmint.run import load_params

CE = losses.softmax_cross_entropy()
SQ = losses.term(lambda out, b: jnp.square(out).mean(-1), name="sq")


MODEL = jaxmint.models.mlp((8,), num_outputs=3)


def _fit(toy, workdir, loss, steps):
    return jaxmint.fit(
        MODEL,
        loss,
        optax.adam(1e-2),
        toy,
        steps=steps,
        batch_size=32,
        workdir=workdir,
        checkpoint_every=10,
        log_every=1,
        progress=False,
    )


def _weights(record):
    return {k: v for k, v in record.items() if k.startswith("weight/")}


def _first_resumed_loss_is_the_codes(toy, workdir, loss, result, at=20):
    """The logged loss of step ``at + 1`` equals the code's loss on the checkpoint's params."""
    weights, _ = load_params(workdir, at)
    batch = next(TrainData(toy, 32, seed=0).batches(at))
    outputs = MODEL.apply({"params": weights["params"]}, batch["x"])
    state = loss.init()
    stored = result.state.loss_state["params"]  # learned weights: the checkpoint's
    want, _ = loss(
        LossInputs(outputs, batch, params=weights["params"]), {**state, "params": stored}
    )
    (record,) = [r for r in result.history if r["step"] == at + 1]
    assert record["loss"] == pytest.approx(float(want), rel=1e-5)


def test_reordered_terms_keep_their_weights_on_resume(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 1.0 * CE + 0.5 * SQ, 20)
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, 0.5 * SQ + 1.0 * CE, 30)
    assert _weights(result.history[-1]) == {"weight/ce": 1.0, "weight/sq": 0.5}
    _first_resumed_loss_is_the_codes(toy, tmp_path, 0.5 * SQ + 1.0 * CE, result)
    assert "weight" not in caplog.text


def test_changed_weight_takes_effect_with_a_warning(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 1.0 * CE + 0.5 * SQ, 20)
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, 1.0 * CE + 0.0 * SQ, 30)
    _first_resumed_loss_is_the_codes(toy, tmp_path, 1.0 * CE + 0.0 * SQ, result)
    last = result.history[-1]
    assert _weights(last) == {"weight/ce": 1.0, "weight/sq": 0.0}
    assert last["loss"] == pytest.approx(last["loss/ce"], rel=1e-6)
    assert "'sq'" in caplog.text and "0.5 -> 0.0" in caplog.text


def test_added_and_removed_terms_without_learned_state_are_named(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 1.0 * CE + 0.5 * SQ, 20)
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, CE, 30)
    assert result.history[-1]["step"] == 30
    _first_resumed_loss_is_the_codes(toy, tmp_path, CE, result)
    assert "loss term removed: 'sq'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        z = losses.term(lambda out, b: jnp.abs(out).mean(-1), name="abs")
        result = _fit(toy, tmp_path, CE + 0.1 * z, 40)
    assert result.history[-1]["weight/abs"] == pytest.approx(0.1)
    _first_resumed_loss_is_the_codes(toy, tmp_path, CE + 0.1 * z, result, at=30)
    assert "loss term added: 'abs'" in caplog.text


def test_renamed_term_with_learned_state_is_refused(tmp_path, toy):
    _fit(toy, tmp_path, losses.uncertainty_weighted(CE, SQ), 20)
    sq2 = losses.term(lambda out, b: jnp.square(out).mean(-1), name="sq2")
    with pytest.raises(LossError, match=r"(?s)sq.*sq2.*--fresh"):
        _fit(toy, tmp_path, losses.uncertainty_weighted(CE, sq2), 30)


def test_learned_loss_parameters_are_restored_by_name(tmp_path, toy):
    first = _fit(toy, tmp_path, losses.uncertainty_weighted(CE, SQ), 20)
    resumed = _fit(toy, tmp_path, losses.uncertainty_weighted(SQ, CE), 20)
    # Nothing to train (already at step 20): the reordered loss reads the same learned weights.
    a = np.asarray(first.state.loss_state["params"]["uncertainty(ce,sq)"]["sq"])
    b = np.asarray(resumed.state.loss_state["params"]["uncertainty(ce,sq)"]["sq"])
    assert a == b and a != 0.0


def test_two_terms_with_one_name_are_refused_when_the_loss_is_built():
    other = losses.term(lambda out, b: jnp.abs(out).mean(-1), name="sq")
    with pytest.raises(LossError, match="both named 'sq'"):
        SQ + 0.5 * other
    with pytest.raises(LossError, match="both named 'sq'"):
        losses.uncertainty_weighted(SQ, other)


def test_a_resumed_run_says_so_and_lists_equal_tuples(tmp_path, toy, capsys, caplog):
    config = {"hidden": [8]}
    kw = dict(batch_size=32, workdir=tmp_path, progress=False, checkpoint_every=10)
    model, opt = jaxmint.models.mlp((8,), num_outputs=3), optax.adam(1e-2)
    jaxmint.fit(model, CE, opt, toy, steps=10, config=config, **kw)
    assert "resuming" not in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        jaxmint.fit(model, CE, opt, toy, steps=20, config={"hidden": (8,)}, **kw)
    assert f"resuming {tmp_path} at step 10 of 20" in capsys.readouterr().out
    assert "changed config" not in caplog.text


def test_positional_learned_weights_of_an_older_checkpoint_are_mapped_by_name():
    loss = losses.uncertainty_weighted(SQ, CE)
    # An older checkpoint kept the log-variances as one array in the order of its terms.
    stored = {"weights": {}, "params": {"r": np.array([0.25, -0.5], np.float32)}}
    state, notes = loss.resume_state(stored, ["ce", "sq"])
    assert state["params"] == {"uncertainty(ce,sq)": {"ce": 0.25, "sq": -0.5}}
    assert "opt_state" not in state and any("older checkpoint layout" in n for n in notes)
    # Not unambiguous (a term the checkpoint never had): the clear refusal instead.
    abs_ = losses.term(lambda out, b: jnp.abs(out).mean(-1), name="abs")
    with pytest.raises(LossError, match="--fresh"):
        losses.uncertainty_weighted(abs_, CE).resume_state(stored, ["ce", "sq"])


def test_renamed_term_without_learned_state_is_named_and_trains(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 1.0 * CE + 0.5 * SQ, 20)
    sq2 = losses.term(lambda out, b: jnp.square(out).mean(-1), name="sq2")
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, 1.0 * CE + 0.5 * sq2, 30)
    assert "loss term removed: 'sq'" in caplog.text and "loss term added: 'sq2'" in caplog.text
    assert _weights(result.history[-1]) == {"weight/ce": 1.0, "weight/sq2": 0.5}
    _first_resumed_loss_is_the_codes(toy, tmp_path, 1.0 * CE + 0.5 * sq2, result)


def test_learned_uncertainty_weights_resume_bit_exactly(tmp_path, toy):
    loss = losses.uncertainty_weighted(CE, SQ)
    straight = _fit(toy, tmp_path / "straight", loss, 30)
    _fit(toy, tmp_path / "resumed", loss, 20)
    resumed = _fit(toy, tmp_path / "resumed", loss, 30)
    want = jax.device_get(straight.state.loss_state)
    got = jax.device_get(resumed.state.loss_state)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
