"""Dynamic batching: merge concurrent requests for one model into one `Predictor.run`.

One worker thread per model takes the oldest waiting request, then gathers the
requests queued behind it whose non-batch shapes and dtypes match, until the
batch holds ``max_batch_size`` examples or the oldest request has waited
``max_delay_s``. It runs the merged batch once and splits the outputs back. While
a batch runs, new requests queue up, so under load batches fill without waiting.

The wait adapts to the clients. A request that finds the worker idle, when the
batch before it was a lone request too, runs at once: nothing suggests company is
coming, and waiting would only add ``max_delay_s`` to every request of a lone
client. Otherwise a batch also stops waiting once it holds as many requests as
the batch before it: with N clients sending back to back, N requests is all that
will come, and the rest of the window would be idle time. Batches grow when more
requests than that are already queued. With ``adaptive=False`` every batch waits
up to ``max_delay_s`` to fill (Triton's fixed window), for devices where a batch
costs far more than an example.

The queue is bounded (``max_queue`` requests): `submit` raises `QueueFull` at once
rather than letting memory grow, and the caller answers 503. Every submitted
request is answered exactly once through ``deliver``, with its outputs or with
the exception the batch raised; `close` answers what is still queued before the
worker exits.

Cost: a merged batch whose size was not declared at export is padded up to the
next declared size by the predictor (no compile); a batch larger than every
declared size compiles once per new size for a symbolic module, which is why the
server's default ``max_batch_size`` is the largest declared size.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxmint_runtime._predictor import Predictor

log = logging.getLogger("jaxmint_runtime.serve")


class QueueFull(RuntimeError):
    """The model's queue holds ``max_queue`` requests already."""


@dataclass(eq=False)
class _Item:
    arrays: dict[str, np.ndarray]
    n: int
    key: tuple
    token: Any
    arrival: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray], n: int, token: Any) -> _Item:
        """Keyed by what must match to share a batch: names, dtypes, non-batch shapes."""
        key = tuple((k, a.dtype.str, a.shape[1:]) for k, a in sorted(arrays.items()))
        return cls(arrays, n, key, token)


def _check_room(predictor: Predictor, waiting: int, max_queue: int, closing: bool) -> None:
    if closing:
        raise QueueFull("the server is shutting down")
    if waiting >= max_queue:
        raise QueueFull(
            f"model {predictor.name!r} has {waiting} requests waiting "
            f"(--max-queue {max_queue}); retry later"
        )


# deliver(list of (token, outputs or None, error or None)), called once per batch.
Deliver = Callable[[list[tuple[Any, dict | None, BaseException | None]]], None]


class Batcher:
    """A bounded request queue and the worker thread that serves it."""

    def __init__(
        self,
        predictor: Predictor,
        deliver: Deliver,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        adaptive: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue >= 1 and max_delay_s >= 0; got "
                f"{max_batch_size}, {max_queue}, {max_delay_s}"
            )
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.adaptive = adaptive
        self._deliver = deliver
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._no_wait = False
        self._queued = 0  # examples waiting
        self._last_batch = 0  # requests in the batch before (0: none yet)
        self._expected = 2  # requests the batch being gathered stops at
        self._thread = threading.Thread(
            target=self._work, name=f"jaxmint-batcher-{predictor.name}", daemon=True
        )
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being run)."""
        return len(self._queue)

    def submit(self, arrays: dict[str, np.ndarray], n: int, token: Any) -> None:
        """Queue validated ``arrays`` of ``n`` examples; ``token`` comes back in deliver."""
        item = _Item.of(arrays, n, token)
        with self._cond:
            _check_room(self.predictor, len(self._queue), self.max_queue, self._closing)
            self._queue.append(item)
            self._queued += n
            # Wake the worker only when it can act: it waits for a first request or
            # for enough examples (a wake-up per request costs a GIL hand-off each).
            if len(self._queue) in (1, self._expected) or self._queued >= self.max_batch_size:
                self._cond.notify()

    def flush(self) -> None:
        """Stop waiting for batches to fill: run what is queued now (used while draining)."""
        with self._cond:
            self._no_wait = True
            self._cond.notify()

    def close(self, timeout: float | None = None) -> bool:
        """Answer everything queued, stop the worker; False if it did not stop in time."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- worker -------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            found_idle = not self._queue
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            if self.adaptive and found_idle and self._last_batch <= 1:
                deadline = 0.0  # a lone request: run it now (see the module docstring)
            else:
                deadline = self._queue[0].arrival + self.max_delay_s
            # requests worth waiting for (fixed window: as many as fit)
            self._expected = max(self._last_batch, 2) if self.adaptive else self.max_queue + 1
            while True:
                chosen, total = select(self._queue, self.max_batch_size)
                remaining = deadline - time.monotonic()
                full = total >= self.max_batch_size or len(chosen) >= self._expected
                if full or self._closing or self._no_wait or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._queue = take(self._queue, chosen)
            self._queued -= total
            self._last_batch = len(chosen)
            return chosen

    def _run(self, batch: list[_Item]) -> None:
        self._deliver(run_batch(self.predictor, batch, self._on_batch))


class LoopBatcher:
    """`Batcher`'s queue, with each batch run on the event loop's own thread.

    For a model whose batch runs in microseconds, handing batches to a worker thread
    costs more than running them: the loop and the worker pass the GIL back and forth
    at every system call. Here `submit` (called on the loop) queues the request, and
    one loop callback runs what queued meanwhile, the requests of one pass over the
    sockets, as a batch (merged by shape as `Batcher` does). Nothing waits for a
    batch to fill, and the loop serves no socket while a batch runs: for fast models
    only (``--batch-on loop``, or what ``auto`` picks for them).
    """

    def __init__(
        self,
        predictor: Predictor,
        deliver: Deliver,
        *,
        loop,
        max_batch_size: int,
        max_queue: int,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(
                f"need max_batch_size >= 1 and max_queue >= 1; got {max_batch_size}, {max_queue}"
            )
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_delay_s = 0.0
        self.max_queue = max_queue
        self._deliver = deliver
        self._on_batch = on_batch
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop, as the server does
        self._queue: deque[_Item] = deque()
        self._scheduled = False
        self._closing = False
        self._drained = threading.Event()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, arrays: dict[str, np.ndarray], n: int, token: Any) -> None:
        """On the loop: queue validated ``arrays``; they run in this loop pass's batch."""
        _check_room(self.predictor, len(self._queue), self.max_queue, self._closing)
        self._queue.append(_Item.of(arrays, n, token))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run_one)

    def _run_one(self) -> None:
        """One batch; another pass of the loop (sockets served between) for the rest."""
        self._scheduled = False
        if self._queue:
            batch = self._take()
            if self._queue:
                self._scheduled = True
                self._loop.call_soon(self._run_one)
            self._deliver(run_batch(self.predictor, batch, self._on_batch))
        if self._closing and not self._queue:
            self._drained.set()

    def _take(self) -> list[_Item]:
        chosen, _ = select(self._queue, self.max_batch_size)
        self._queue = take(self._queue, chosen)
        return chosen

    def flush(self) -> None:
        """Nothing waits to fill here."""

    def close(self, timeout: float | None = None) -> bool:
        """Answer everything queued, refuse new requests; False if not done in time."""
        self._closing = True
        if threading.get_ident() == self._loop_thread:
            while self._queue:
                self._deliver(run_batch(self.predictor, self._take(), self._on_batch))
            return True
        try:
            self._loop.call_soon_threadsafe(self._run_one)
        except RuntimeError:  # the loop is closed: nothing can answer what is left
            return not self._queue
        return self._drained.wait(timeout)


def select(queue: deque[_Item], max_batch_size: int) -> tuple[list[_Item], int]:
    """The oldest request and the compatible ones behind it that still fit, in order."""
    first = queue[0]
    chosen, total = [first], first.n
    for item in itertools.islice(queue, 1, None):
        if total >= max_batch_size:
            break
        if item.key != first.key:
            continue
        if total + item.n > max_batch_size:
            break
        chosen.append(item)
        total += item.n
    return chosen, total


def take(queue: deque[_Item], chosen: list[_Item]) -> deque[_Item]:
    """``queue`` without ``chosen``: popped from the front when they lead it (the usual
    case), else a new queue of the rest, in order."""
    if all(a is b for a, b in zip(chosen, queue, strict=False)):
        for _ in chosen:
            queue.popleft()
        return queue
    taken = {id(item) for item in chosen}
    return deque(it for it in queue if id(it) not in taken)


def run_batch(predictor: Predictor, batch: list[_Item], on_batch) -> list[tuple]:
    """Run the merged batch once; ``(token, outputs, error)`` per request, in order."""
    total = sum(item.n for item in batch)
    try:
        if len(batch) == 1:
            arrays = batch[0].arrays
        else:
            arrays = {k: np.concatenate([it.arrays[k] for it in batch]) for k in batch[0].arrays}
        outputs = predictor.run(arrays)
    except Exception as e:  # answer every request of the batch, keep serving
        log.exception("model %r failed on a batch of %d", predictor.name, total)
        results = [(item.token, None, e) for item in batch]
    else:
        results, start = [], 0
        for item in batch:
            stop = start + item.n
            results.append((item.token, {k: v[start:stop] for k, v in outputs.items()}, None))
            start = stop
    if on_batch is not None:
        on_batch(total)
    return results
