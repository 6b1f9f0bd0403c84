"""``batch_on="loop"``: batches run on the event loop's thread, without a worker;
``batch_on="auto"`` (the default) chooses per model by timing a full batch."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time

import numpy as np
import pytest
from runtime_helpers import concurrently, json_body, output_of, request

from jaxmint_runtime import Predictor
from jaxmint_runtime.serve import Server
from jaxmint_runtime.serve._batcher import Batcher, LoopBatcher
from jaxmint_runtime.serve._server import LOOP_BATCH_S

INFER = "/v2/models/digits/infer"


def slowed(predictor, seconds):
    """The predictor, taking ``seconds`` more per batch: requests pile up meanwhile."""
    slow = copy.copy(predictor)
    slow.run = lambda arrays: (time.sleep(seconds), Predictor.run(predictor, arrays))[1]
    return slow


def test_requests_that_arrive_while_a_batch_runs_merge_into_the_next(predictor, inputs):
    with Server([slowed(predictor, 0.1)], port=0, batch_on="loop") as server:
        results = concurrently(server.port, INFER, 16, lambda i: json_body(inputs[i : i + 1]))
        for i, response in results.items():
            assert response[0] == 200
            want = predictor.run({"x": inputs[i : i + 1]})["output"]
            np.testing.assert_allclose(output_of(*response), want, rtol=1e-5, atol=1e-6)
        counts = server.metrics.batch_counts("digits")
        batches = counts[float("inf")]
        assert batches < 16, f"16 concurrent requests ran as {batches} batches: nothing merged"
        assert counts[1.0] < batches  # some batch held more than one example


def test_a_full_queue_answers_503_and_a_failing_model_500(predictor, inputs):
    with Server([slowed(predictor, 0.3)], port=0, batch_on="loop", max_queue=2) as server:
        results = concurrently(server.port, INFER, 12, lambda i: json_body(inputs[i : i + 1]))
        statuses = [status for status, _, _ in results.values()]
        assert set(statuses) == {200, 503}, statuses
        refused = next(body for status, _, body in results.values() if status == 503)
        assert "--max-queue 2" in json.loads(refused)["error"]

    def broken_run(arrays):
        raise RuntimeError("the accelerator caught fire")

    broken = copy.copy(predictor)
    broken.run = broken_run
    with Server([broken], port=0, batch_on="loop") as server:
        status, _, body = request(server.port, "POST", INFER, json_body(inputs[:1]))
        assert status == 500 and "caught fire" in json.loads(body)["error"]
        assert request(server.port, "GET", "/v2/health/live")[0] == 200


def test_close_from_another_thread_answers_what_is_queued(predictor, inputs):
    answered = []

    async def main():
        loop = asyncio.get_running_loop()
        batcher = LoopBatcher(predictor, answered.extend, loop=loop, max_batch_size=2, max_queue=8)
        for i in range(5):
            batcher.submit({"x": inputs[i : i + 1]}, 1, i)
        closed = await loop.run_in_executor(None, batcher.close, 10)
        with pytest.raises(Exception, match="shutting down"):
            batcher.submit({"x": inputs[:1]}, 1, 99)
        return closed

    assert asyncio.run(main()) is True
    assert [token for token, _, _ in answered] == [0, 1, 2, 3, 4]
    assert all(error is None for _, _, error in answered)


def test_an_unknown_batch_on_is_refused(predictor):
    with pytest.raises(ValueError, match="'auto', 'thread' or 'loop'"):
        Server([predictor], port=0, batch_on="gpu")


def counted(predictor, seconds):
    """`slowed`, counting its runs."""
    slow, runs = slowed(predictor, seconds), []
    run = slow.run
    slow.run = lambda arrays: (runs.append(len(arrays["x"])), run(arrays))[1]
    return slow, runs


def test_auto_runs_a_fast_models_batches_on_the_loop_and_a_slow_ones_on_a_thread(
    predictor, inputs, caplog
):
    caplog.set_level(logging.INFO, logger="jaxmint_runtime.serve")
    assert predictor.time_batch(32) < LOOP_BATCH_S  # the digits MLP: microseconds
    with Server([predictor], port=0) as server:
        assert server.config.batch_on == "auto"
        assert isinstance(server.served["digits"]["1"].batcher, LoopBatcher)
        status, _, body = request(server.port, "GET", "/v2/models/digits/config")
        assert status == 200 and json.loads(body)["batch_on"] == "loop"
        response = request(server.port, "POST", INFER, json_body(inputs[:1]))
        want = predictor.run({"x": inputs[:1]})["output"]
        np.testing.assert_allclose(output_of(*response), want, rtol=1e-5, atol=1e-6)
    assert "a batch of 32 takes" in caplog.text and "event loop (--batch-on auto)" in caplog.text

    # 20 ms a batch: a worker thread, and the timing stopped after one slow run
    slow, runs = counted(predictor, 0.02)
    with Server([slow], port=0) as server:
        assert runs == [32]
        assert isinstance(server.served["digits"]["1"].batcher, Batcher)
        status, _, body = request(server.port, "GET", "/v2/models/digits/config")
        assert json.loads(body)["batch_on"] == "thread"
        assert request(server.port, "POST", INFER, json_body(inputs[:1]))[0] == 200
    assert "worker thread (--batch-on auto)" in caplog.text


@pytest.mark.parametrize(
    "overrides, where",
    [
        ({"batching": False}, "thread"),  # nothing to batch: as --no-batching always ran
        ({"batch_window": "fixed"}, "thread"),  # a window that waits needs the thread
        ({"batch_on": "thread"}, "thread"),
        ({"batch_on": "loop"}, "loop"),  # said explicitly: not timed
    ],
)
def test_auto_leaves_the_thread_where_batches_wait_and_obeys_an_explicit_choice(
    predictor, overrides, where
):
    model, runs = counted(predictor, 0.0)
    with Server([model], port=0, **overrides) as server:
        assert server.served["digits"]["1"].batch_on == where
        assert runs == []  # nothing was timed


def test_auto_gives_a_model_whose_batch_fails_the_thread_and_serves_its_errors(
    predictor, inputs, caplog
):
    def broken_run(arrays):
        raise RuntimeError("the accelerator caught fire")

    broken = copy.copy(predictor)
    broken.run = broken_run
    with Server([broken], port=0) as server:
        assert server.served["digits"]["1"].batch_on == "thread"
        status, _, body = request(server.port, "POST", INFER, json_body(inputs[:1]))
        assert status == 500 and "caught fire" in json.loads(body)["error"]
    assert "timing a batch of 32 failed (the accelerator caught fire)" in caplog.text


def test_time_batch_feeds_a_ranged_input_ids_it_accepts(predictor):
    """An input declared as ids in [5, 10) is timed with 5s, not zeros it would refuse."""
    from jaxmint_runtime._predictor import TensorSpec

    ids = copy.copy(predictor)
    ids.inputs = [TensorSpec("x", "int32", ("batch", 64), range=(5, 10))]
    seen = []
    ids.run = lambda arrays: seen.append(arrays["x"]) or {}
    assert ids.time_batch(4, repeats=2) >= 0
    assert len(seen) == 2 and seen[0].shape == (4, 64) and seen[0].dtype == np.int32
    assert (seen[0] == 5).all()
