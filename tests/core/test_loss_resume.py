"""Loss state is keyed by name: a resumed run trains the loss as the code writes it."""

import logging

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
from jaxmint import losses
from jaxmint.losses import LossError

CE = losses.softmax_cross_entropy()
SQ = losses.term(lambda out, b: jnp.square(out).mean(-1), name="sq")


def _fit(toy, workdir, loss, steps):
    return jaxmint.fit(
        jaxmint.models.mlp((8,), num_outputs=3),
        loss,
        optax.adam(1e-2),
        toy,
        steps=steps,
        batch_size=32,
        workdir=workdir,
        checkpoint_every=10,
        log_every=5,
        progress=False,
    )


def _weights(record):
    return {k: v for k, v in record.items() if k.startswith("weight/")}


def test_reordered_terms_keep_their_weights_on_resume(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 1.0 * CE + 0.5 * SQ, 20)
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, 0.5 * SQ + 1.0 * CE, 30)
    assert _weights(result.history[-1]) == {"weight/ce": 1.0, "weight/sq": 0.5}
    assert "weight" not in caplog.text


def test_changed_weight_takes_effect_with_a_warning(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 1.0 * CE + 0.5 * SQ, 20)
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, 1.0 * CE + 0.0 * SQ, 30)
    last = result.history[-1]
    assert _weights(last) == {"weight/ce": 1.0, "weight/sq": 0.0}
    assert last["loss"] == pytest.approx(last["loss/ce"], rel=1e-6)
    assert "'sq'" in caplog.text and "0.5 -> 0.0" in caplog.text


def test_added_and_removed_terms_without_learned_state_are_named(tmp_path, toy, caplog):
    _fit(toy, tmp_path, 1.0 * CE + 0.5 * SQ, 20)
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        result = _fit(toy, tmp_path, CE, 30)
    assert result.history[-1]["step"] == 30
    assert "loss term removed: 'sq'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxmint"):
        z = losses.term(lambda out, b: jnp.abs(out).mean(-1), name="abs")
        result = _fit(toy, tmp_path, CE + 0.1 * z, 40)
    assert result.history[-1]["weight/abs"] == pytest.approx(0.1)
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
