"""The public contract's names exist and keep working."""

import jaxmint
from jaxmint import checkpoint, data, losses, models, train


def test_contract_names():
    for name in ("Model", "fit", "models", "losses"):
        assert hasattr(jaxmint, name)
    for name in ("from_linen", "from_nnx", "mlp", "cnn", "transformer", "Model"):
        assert hasattr(models, name)
    assert hasattr(losses, "term")
    assert jaxmint.Model is models.Model


def test_all_lists_resolve():
    for module in (jaxmint, models, losses, train, data, checkpoint):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
