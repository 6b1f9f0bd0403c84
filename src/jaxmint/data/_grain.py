"""Grain pipelines: what `fit` reads from a record source or a Grain dataset, and the
iterator state that each checkpoint stores so that a run resumes on the same batch."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from absl import flags

from jaxmint._extras import require
from jaxmint.data._files import RecordSource
from jaxmint.data._loader import Batch, DataError

log = logging.getLogger("jaxmint")

_KEEP_STATES = 256  # the iterator states of the newest batches read (prefetch reads ahead)


def is_grain(data: Any) -> bool:
    """Whether ``data`` is a Grain dataset or loader (checked without importing Grain)."""
    return any(
        cls.__module__.startswith("grain.")
        and cls.__name__ in ("MapDataset", "IterDataset", "DataLoader")
        for cls in type(data).__mro__
    )


def pipeline(
    source: RecordSource,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    shard: tuple[int, int] = (0, 1),
    workers: int = 0,
    threads: int = 0,
    buffer: int = 256,
):
    """The Grain pipeline `fit` builds from a record source.

    Records are shuffled each epoch from ``seed`` (Grain's index shuffle: no
    buffer, the whole epoch), repeated forever, and process ``i`` of ``n``
    (``shard=(i, n)``) takes every ``n``-th record, so the ``n`` processes' batches of
    ``batch_size // n`` together are one global batch and an epoch is read exactly
    once. ``threads`` read records in each process; ``workers`` > 0 moves reading
    and batching to that many worker processes. Returns a ``grain.IterDataset``
    whose iterator state can be saved and restored.

    Example::

        ds = pipeline(NpyShards("data/train"), batch_size=64, seed=0, workers=2)
        batch = next(iter(ds))
    """
    grain = require("grain", "data", "reading files through a Grain pipeline")
    count = shard[1]
    if batch_size % count:
        raise DataError(f"batch_size {batch_size} is not divisible by {count} processes")
    if len(source) < batch_size:
        raise DataError(
            f"batch_size {batch_size} is larger than the dataset ({len(source)} examples in "
            f"{source!r}); lower --batch-size"
        )
    # Element k is global batch k: its indices, then this process's share, read at once.
    batches = _EpochOrder(len(source), batch_size, seed=seed, shuffle=shuffle, shard=shard)
    ds = grain.MapDataset.range(_FOREVER).map(batches).map(_Read(source))
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    it = ds.to_iter_dataset(options)
    if workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_exit_with_parent
        )
    return it


_PARENT_POLL_S = 0.5


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Run in each worker process: exit once the training process is gone.

    A trainer that is killed (SIGKILL, the OOM killer, a preempted node's agent)
    cannot stop its workers, and Grain's idle workers would wait on their queues for
    ever, each holding its memory. A daemon thread watches the parent's pid instead
    (``PR_SET_PDEATHSIG`` fires when the spawning *thread* exits, not the process).
    """
    del worker_index, worker_count
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="jaxmint-exit-with-parent", daemon=True).start()


_FOREVER = 1 << 62  # batches: the pipeline repeats its epochs without end


class _EpochOrder:
    """Global batch ``k`` -> the indices of this process's share of it.

    Epoch ``e`` visits the records in ``default_rng([seed, e]).permutation(n)`` order,
    a pure function of the seed and epoch like `ArrayLoader`'s, batch by batch; the
    last partial batch of an epoch is dropped. Process ``i`` of ``n`` takes every
    ``n``-th index of each batch. One permutation (4 or 8 bytes a record) is computed
    per epoch and kept: Grain's per-index shuffle costs about 10 microseconds an index,
    more than a small model's step for a batch of 64.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool, shard):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.index, self.count = shard
        self.steps_per_epoch = n // batch_size
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def order(self, epoch: int) -> np.ndarray:
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                dtype = np.int32 if self.n < 2**31 else np.int64
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, epoch])
                    order = rng.permutation(self.n).astype(dtype)
                else:
                    order = np.arange(self.n, dtype=dtype)
                self._orders[epoch] = order
                while len(self._orders) > 2:  # reader threads straddle one epoch boundary
                    self._orders.popitem(last=False)
            return order

    def __call__(self, k) -> np.ndarray:
        epoch, i = divmod(int(k), self.steps_per_epoch)
        batch = self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return batch[self.index :: self.count]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_orders": OrderedDict(), "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


class _Read:
    """Reads a batch of indices from a source (a class, so worker processes receive it)."""

    def __init__(self, source: RecordSource):
        self.source = source

    def __call__(self, indices: np.ndarray) -> Batch:
        return self.source.read(indices)


def _absl_flags_parsed() -> None:
    """Grain's worker processes read an absl flag, which fails in a script that never
    parsed absl flags (google/grain#1355): there, take the flags' defaults as parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class GrainData:
    """A Grain dataset or loader as `fit` reads it, remembering each batch's iterator state.

    ``state_after(step)`` is the state once the batch of ``step`` was read: what a
    checkpoint at ``step`` stores. Batches are read ahead (prefetch), so the state
    of each of the newest batches is kept until its step is checkpointed.
    """

    def __init__(self, data, batch_size: int, *, seed: int, shard: tuple[int, int], workers=0):
        if isinstance(data, RecordSource):
            data = pipeline(data, batch_size, seed=seed, shard=shard, workers=workers)
        self.iterator = iter(data)
        if not hasattr(self.iterator, "get_state"):
            raise DataError(f"{type(data).__name__} gives an iterator without a state to save")
        self._initial = self._state()
        try:
            self.first = next(self.iterator)
        except StopIteration:
            raise DataError(f"the Grain dataset {data!r} yielded no batch") from None
        per_process = batch_size // shard[1]
        if not isinstance(self.first, dict):
            raise DataError(
                f"the Grain dataset yields {type(self.first).__name__}, not a batch (a dict of "
                "arrays); map its records to dicts such as {'x': ..., 'y': ...}"
            )
        sizes = {k: np.shape(v)[:1] for k, v in self.first.items()}
        if any(s != (per_process,) for s in sizes.values()):
            raise DataError(
                f"the Grain dataset's first batch has leading axes {sizes}, but batch_size is "
                f"{batch_size} ({per_process} per process): batch it with "
                f".batch({per_process}, drop_remainder=True), or pass a record source such as "
                "jaxmint.data.NpyShards and let fit build the pipeline"
            )
        self._states: OrderedDict[int, bytes] = OrderedDict()
        self._resume: bytes | None = None

    def _state(self) -> bytes:
        state = self.iterator.get_state()
        return state if isinstance(state, bytes) else json.dumps(state).encode()

    def _set_state(self, state: bytes) -> None:
        if isinstance(self.iterator, _dataset_iterator()):
            self.iterator.set_state(json.loads(state))
        else:
            self.iterator.set_state(state)

    def resume_from(self, state: bytes | None) -> None:
        """The state a checkpoint stored: `batches` starts there."""
        self._resume = state

    def batches(self, start_step: int) -> Iterator[Batch]:
        if start_step and self._resume is None:
            log.warning(
                "the checkpoint holds no data iterator state: skipping the %d batches already "
                "used, by reading them",
                start_step,
            )
        self._set_state(self._resume if start_step and self._resume else self._initial)
        skip = start_step if start_step and self._resume is None else 0
        step = start_step - skip
        for batch in self.iterator:
            step += 1
            if step <= start_step:
                continue
            self._states[step] = self._state()
            while len(self._states) > _KEEP_STATES:
                self._states.popitem(last=False)
            yield batch

    def close(self) -> None:
        """Stop the reader threads and worker processes (and free their shared memory)."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

    def state_after(self, step: int) -> bytes:
        if step == 0:
            return self._initial
        try:
            return self._states[step]
        except KeyError:
            raise DataError(
                f"no data iterator state for step {step}: it was read more than "
                f"{_KEEP_STATES} batches ago"
            ) from None


def _dataset_iterator():
    import grain

    return grain.DatasetIterator


def first_examples(data, n: int) -> dict[str, np.ndarray]:
    """Up to ``n`` examples from the start of any training data `fit` takes: a dict of
    arrays, a record source, a Grain dataset or loader, or an iterable of batches
    (a sample for shapes: export, summaries)."""
    if isinstance(data, Mapping):
        return {k: np.asarray(v[:n]) for k, v in data.items()}
    if isinstance(data, RecordSource):
        records = [data[i] for i in range(min(n, len(data)))]
        return {k: np.stack([r[k] for r in records]) for k in records[0]}
    first = next(iter(data))
    return {k: np.asarray(v[:n]) for k, v in first.items()}
