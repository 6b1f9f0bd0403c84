"""The shipped experiments define a sweep() whose space names real config fields."""

from pathlib import Path

import pytest

import jaxmint.sweep
from jaxmint.sweep import Spec
from jaxmint.sweep._worker import base_config, load_sweep

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["digits_mlp", "char_transformer"])
def test_experiment_sweep_is_valid(name):
    module, spec = load_sweep(REPO / "experiments" / f"{name}.py")
    assert isinstance(spec, Spec) and spec.budget >= 8
    config = base_config(module, ["--smoke"])
    for field in spec.space:
        assert hasattr(config, field)


def test_digits_sweeps_a_loss_term_weight():
    _, spec = load_sweep(REPO / "experiments" / "digits_mlp.py")
    assert "weight_decay" in spec.space and spec.objective == "eval/accuracy"


def test_public_names_resolve():
    for name in jaxmint.sweep.__all__:
        assert hasattr(jaxmint.sweep, name), name
