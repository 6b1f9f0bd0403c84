"""The loader is a pure function of (seed, epoch); datasets need no download."""

import numpy as np
import pytest

import jaxmint
from jaxmint.data import ArrayLoader, BatchSpec, DataError, eval_batches, prefetch_to_device


def arrays(n=10):
    return {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2), "y": np.arange(n)}


def take(it, n):
    return [next(it) for _ in range(n)]


def test_epochs_cover_each_example_once_and_drop_remainder():
    loader = ArrayLoader(arrays(10), 3, seed=1)
    assert loader.steps_per_epoch == 3
    epoch = take(loader.batches(0), 3)
    seen = np.concatenate([b["y"] for b in epoch])
    assert len(set(seen)) == 9
    np.testing.assert_array_equal(epoch[0]["x"][:, 0], epoch[0]["y"] * 2)


def test_order_is_pure_in_seed_and_epoch_and_resumes_exactly():
    a = take(ArrayLoader(arrays(), 3, seed=7).batches(0), 8)
    b = take(ArrayLoader(arrays(), 3, seed=7).batches(5), 3)
    for x, y in zip(a[5:], b, strict=True):
        np.testing.assert_array_equal(x["y"], y["y"])
    other = take(ArrayLoader(arrays(), 3, seed=8).batches(0), 3)
    assert any(not np.array_equal(x["y"], y["y"]) for x, y in zip(a, other, strict=False))
    assert ArrayLoader(arrays(), 3, seed=7).position(7) == (2, 1)


def test_eval_batches_pad_and_count():
    got = list(eval_batches(arrays(10), 4))
    assert [n for _, n in got] == [4, 4, 2]
    assert all(b["x"].shape == (4, 2) for b, _ in got)


def test_prefetch_preserves_order_and_raises_producer_errors():
    out = list(prefetch_to_device(iter([{"a": np.ones(2) * i} for i in range(5)]), 2))
    assert [float(b["a"][0]) for b in out] == [0, 1, 2, 3, 4]

    def broken():
        yield {"a": np.ones(2)}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        list(prefetch_to_device(broken(), 2))


def test_errors_name_the_problem():
    with pytest.raises(DataError, match="leading"):
        ArrayLoader({"x": np.zeros((4, 2)), "y": np.zeros(5)}, 2)
    with pytest.raises(DataError, match="scalar"):
        ArrayLoader({"x": np.float32(1.0)}, 1)
    spec = BatchSpec({"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(DataError, match=r"batch\['x'\] has shape \(2, 3\) and dtype float64"):
        spec.check({"x": np.zeros((2, 3))})
    with pytest.raises(DataError, match=r"missing \['x'\], unexpected \['z'\]"):
        spec.check({"z": np.zeros((2, 3), np.float32)})


def test_digits_is_embedded_and_split():
    train, test = jaxmint.data.digits()
    assert train["x"].shape == (1438, 64) and test["x"].shape == (359, 64)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
    assert train["x"].min() >= 0.0 and train["x"].max() <= 1.0
    img, _ = jaxmint.data.digits(image=True)
    assert img["x"].shape == (1438, 8, 8, 1)


def test_stdlib_chars_is_next_byte_prediction():
    train, test = jaxmint.data.stdlib_chars(16, max_bytes=20_000)
    assert train["x"].shape[1] == 16 and train["x"].dtype == np.int32
    np.testing.assert_array_equal(train["x"][0, 1:], train["y"][0, :-1])
    np.testing.assert_array_equal(train["y"][0, -1], train["x"][1, 0])
    assert len(test["x"]) >= 1
