"""models.summary: layer table, totals, FLOPs."""

import jax
import numpy as np

import jaxmint


def real_count(model, x):
    variables = model.init(jax.random.PRNGKey(0), x)
    return sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))


def test_summary_totals_equal_the_real_parameter_count(capsys):
    x = np.zeros((4, 64), np.float32)
    model = jaxmint.models.mlp([32, 16], num_outputs=10)
    s = jaxmint.models.summary(model, {"x": x, "y": np.zeros(4, np.int32)})
    assert s.total_params == real_count(model, x) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert s.total_bytes == 4 * s.total_params
    assert [layer.name for layer in s.layers] == ["dense0", "dense1", "head"]
    assert s.layers[0].shapes == {"kernel": (64, 32), "bias": (32,)}
    assert s.activations == {"outputs": (4, 10), "act0": (4, 32), "act1": (4, 16)}
    # A matmul's multiply-adds: XLA counts about 2 * params FLOPs per example.
    assert s.flops_per_example is not None
    assert 1.5 * s.total_params < s.flops_per_example < 3 * s.total_params
    printed = capsys.readouterr().out
    assert "dense0" in printed and f"{s.total_params:,}" in printed and "FLOPs" in printed


def test_summary_of_a_cnn_with_batch_stats():
    x = np.zeros((2, 8, 8, 1), np.float32)
    model = jaxmint.models.cnn([4, 8], num_outputs=10)
    s = jaxmint.models.summary(model, x, show=False)
    assert s.total_params == real_count(model, x)
    assert "conv0" in [layer.name for layer in s.layers]
    assert s.activations["act1"] == (2, 4, 4, 8)


def test_summary_counts_every_layer_of_a_scanned_model():
    # XLA's cost analysis counts a loop's body once; the summary counts every pass.
    x = np.zeros((2, 32), np.int32)
    shape = dict(max_len=32, d_model=32, num_layers=4, num_heads=4)
    unrolled = jaxmint.models.summary(jaxmint.models.transformer(64, **shape), x, show=False)
    scanned = jaxmint.models.transformer(64, scan_layers=True, **shape)
    s = jaxmint.models.summary(scanned, x, show=False)
    assert s.total_params == unrolled.total_params
    assert s.flops_per_example == unrolled.flops_per_example
