"""Dynamic batching: merging, shape separation, the bounded queue, errors, close."""

import threading
import time

import numpy as np
import pytest

from jaxmint_runtime.serve._batcher import Batcher, QueueFull


class Recorder:
    """A stand-in predictor: doubles its input and records each batch's shape."""

    name = "fake"

    def __init__(self, fail=False, delay_s=0.0):
        self.shapes, self.fail, self.delay_s = [], fail, delay_s

    def run(self, arrays):
        time.sleep(self.delay_s)
        self.shapes.append(arrays["x"].shape)
        if self.fail:
            raise RuntimeError("boom")
        return {"y": arrays["x"] * 2}


class Results:
    def __init__(self):
        self.items, self.done = {}, threading.Event()
        self.expected = 0

    def deliver(self, results):
        for token, outputs, error in results:
            assert token not in self.items, f"request {token} answered twice"
            self.items[token] = (outputs, error)
        if len(self.items) >= self.expected:
            self.done.set()

    def wait(self, n, timeout=10):
        self.expected = n
        if len(self.items) >= n:
            return self.items
        self.done.clear()
        if len(self.items) >= n:  # answered between the check and the clear
            return self.items
        assert self.done.wait(timeout), f"only {len(self.items)} of {n} answered"
        return self.items


def make(predictor, results, **kw):
    kw = {"max_batch_size": 8, "max_delay_s": 0.2, "max_queue": 100, **kw}
    return Batcher(predictor, results.deliver, **kw)


def test_concurrent_requests_merge_and_split_back():
    pred, results = Recorder(), Results()
    batcher = make(pred, results)
    xs = [np.full((1 + i % 2, 3), i, np.float32) for i in range(5)]  # 1 or 2 examples each
    for i, x in enumerate(xs):
        batcher.submit({"x": x}, x.shape[0], i)
    got = results.wait(5)
    assert pred.shapes == [(7, 3)]  # one batch of every request's examples
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(got[i][0]["y"], x * 2)
    assert batcher.close(5)


def test_a_lone_request_runs_at_once_and_a_crowd_merges():
    pred, results = Recorder(delay_s=0.05), Results()
    batcher = make(pred, results, max_delay_s=2.0)
    for i in range(3):  # one client, one request at a time: no waiting for company
        start = time.monotonic()
        batcher.submit({"x": np.full((1, 3), i, np.float32)}, 1, i)
        results.wait(i + 1)
        assert time.monotonic() - start < 1.0, "a lone request waited for the batch delay"
    batcher.submit({"x": np.zeros((1, 3), np.float32)}, 1, "first")
    time.sleep(0.01)  # it runs (50 ms); a crowd arrives meanwhile and merges
    for i in range(4):
        batcher.submit({"x": np.ones((1, 3), np.float32)}, 1, f"crowd{i}")
    results.wait(8, timeout=10)
    assert pred.shapes == [(1, 3)] * 4 + [(4, 3)]
    batcher.close()


def test_a_fixed_window_always_waits_for_the_batch_to_fill():
    pred, results = Recorder(), Results()
    batcher = make(pred, results, max_delay_s=0.3, adaptive=False)
    start = time.monotonic()
    batcher.submit({"x": np.zeros((1, 3), np.float32)}, 1, "lone")
    results.wait(1)
    assert time.monotonic() - start >= 0.25  # waited for company that never came
    batcher.close()


def test_full_batch_runs_without_waiting_for_the_delay():
    pred, results = Recorder(), Results()
    batcher = make(pred, results, max_batch_size=4, max_delay_s=30)
    t = time.monotonic()
    for i in range(4):
        batcher.submit({"x": np.zeros((1, 3), np.float32)}, 1, i)
    results.wait(4)
    assert time.monotonic() - t < 10 and pred.shapes == [(4, 3)]
    assert batcher.close(5)


def test_different_non_batch_shapes_never_merge():
    pred, results = Recorder(), Results()
    batcher = make(pred, results)
    for i in range(6):
        batcher.submit({"x": np.zeros((1, 3 + i % 2), np.float32)}, 1, i)
    results.wait(6)
    assert sorted(pred.shapes) == [(3, 3), (3, 4)]
    assert batcher.close(5)


def test_batches_respect_max_batch_size_and_big_requests_run_alone():
    pred, results = Recorder(), Results()
    batcher = make(pred, results, max_batch_size=4, max_delay_s=0.05)
    for i, n in enumerate([3, 3, 10, 1]):
        batcher.submit({"x": np.zeros((n, 2), np.float32)}, n, i)
    results.wait(4)
    assert all(s[0] <= 4 for s in pred.shapes if s[0] != 10)
    assert (10, 2) in pred.shapes and sum(s[0] for s in pred.shapes) == 17
    assert batcher.close(5)


def test_full_queue_refuses_at_once_and_loses_nothing():
    pred, results = Recorder(delay_s=0.05), Results()
    batcher = make(pred, results, max_batch_size=1, max_delay_s=0, max_queue=3)
    accepted, refused = [], []
    for i in range(20):
        t = time.monotonic()
        try:
            batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, i)
            accepted.append(i)
        except QueueFull as e:
            assert time.monotonic() - t < 0.05 and "--max-queue" in str(e)
            refused.append(i)
    assert refused and len(accepted) >= 3
    got = results.wait(len(accepted))
    assert sorted(got) == accepted
    assert batcher.close(5)


def test_a_failing_batch_answers_every_request_with_the_error():
    pred, results = Recorder(fail=True), Results()
    batcher = make(pred, results, max_delay_s=0.05)
    for i in range(3):
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, i)
    got = results.wait(3)
    assert all(out is None and "boom" in str(err) for out, err in got.values())
    assert batcher.close(5)


def test_close_answers_what_is_queued_then_refuses():
    pred, results = Recorder(), Results()
    batcher = make(pred, results, max_delay_s=60)
    for i in range(3):
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, i)
    assert batcher.close(5)
    assert len(results.wait(3)) == 3
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, 99)
