"""A deterministic in-memory loader and the checks every batch goes through."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxmint_runtime._predictor import outside_range

Batch = dict[str, Any]


class DataError(ValueError):
    """A dataset or batch does not have the keys, shapes or dtypes that are needed."""


def check_arrays(arrays: Mapping[str, Any], what: str = "data") -> int:
    """Check ``arrays`` is a dict of arrays sharing a leading axis; return its length."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise DataError(f"{what} must be a non-empty dict of arrays, got {type(arrays).__name__}")
    sizes = {}
    for key, value in arrays.items():
        shape = np.shape(value)
        if not shape:
            raise DataError(f"{what}[{key!r}] is a scalar; every array needs a leading batch axis")
        sizes[key] = shape[0]
    if len(set(sizes.values())) != 1:
        raise DataError(f"{what} arrays differ in their leading (example) axis: {sizes}")
    return next(iter(sizes.values()))


class ArrayLoader:
    """Batches from a dict of numpy arrays, reshuffled each epoch.

    The order of epoch ``e`` is a pure function of ``(seed, e)``, so the position
    in the data is just the step number: ``batches(start_step)`` continues exactly
    where a run stopped. The last partial batch of each epoch is dropped. With
    ``shard=(i, n)``, only the rows of process ``i`` (a contiguous block of each
    global batch) are gathered.

    Example::

        loader = ArrayLoader({"x": x, "y": y}, batch_size=32, seed=0)
        batch = next(loader.batches(start_step=0))
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shard: tuple[int, int] = (0, 1),
    ):
        self.num_examples = check_arrays(arrays)
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if batch_size > self.num_examples:
            raise DataError(
                f"batch_size {batch_size} is larger than the dataset ({self.num_examples} "
                "examples); lower --batch-size"
            )
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = self.num_examples // batch_size
        self.shard_index, self.shard_count = shard
        if batch_size % self.shard_count:
            raise DataError(
                f"batch_size {batch_size} is not divisible by {self.shard_count} processes"
            )

    def order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``: a pure function of (seed, epoch)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, index in epoch)`` of the batch used at ``step``."""
        return divmod(step, self.steps_per_epoch)

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Yield batches forever, starting with the one of ``start_step``."""
        epoch, index = self.position(start_step)
        while True:
            order = self.order(epoch)
            for i in range(index, self.steps_per_epoch):
                idx = np.sort(order[i * self.batch_size : (i + 1) * self.batch_size])
                if self.shard_count > 1:  # this process's contiguous block of the batch
                    per = self.batch_size // self.shard_count
                    idx = idx[self.shard_index * per : (self.shard_index + 1) * per]
                yield {k: v[idx] for k, v in self.arrays.items()}
            epoch, index = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)


def eval_batches(arrays: Mapping[str, Any], batch_size: int) -> Iterator[tuple[Batch, int]]:
    """Yield ``(batch, num_valid)`` covering every example once.

    The last batch is padded to ``batch_size`` by repeating the final example, so
    evaluation compiles once; ``num_valid`` says how many rows are real.
    """
    n = check_arrays(arrays, "eval_data")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        idx = np.arange(start, start + batch_size).clip(max=n - 1)
        yield {k: np.asarray(v)[idx] for k, v in arrays.items()}, stop - start


class BatchSpec:
    """The keys, per-example shapes and dtypes of the first batch; later batches must match."""

    def __init__(self, batch: Mapping[str, Any]):
        check_arrays(batch, "batch")
        self.spec = {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}

    def check(self, batch: Mapping[str, Any], what: str = "batch") -> None:
        """Raise `DataError` naming the key if ``batch`` differs from the first batch."""
        if batch.keys() != self.spec.keys():
            missing = sorted(set(self.spec) - set(batch))
            extra = sorted(set(batch) - set(self.spec))
            raise DataError(
                f"{what} keys differ from the first batch: missing {missing}, unexpected {extra}"
            )
        for key, (shape, dtype) in self.spec.items():
            value = batch[key]
            got_shape, got_dtype = np.shape(value), value.dtype
            if got_shape != shape or got_dtype != dtype:
                raise DataError(
                    f"{what}[{key!r}] has shape {got_shape} and dtype {got_dtype}, expected "
                    f"shape {shape} and dtype {dtype} like the first batch; a new shape would "
                    "recompile the step, so pad or drop the remainder"
                )

    def require(self, keys: Iterable[str], why: str) -> None:
        for key in keys:
            if key not in self.spec:
                raise DataError(f"the batch has no key {key!r} ({why}); keys: {sorted(self.spec)}")


def prefetch_to_device(batches: Iterator[Batch], size: int = 2, put=None) -> Iterator[Batch]:
    """Move batches to the device in a background thread, ``size`` ahead of the consumer.

    ``put`` places one batch (default: ``jax.device_put``), e.g. sharded over a mesh.
    """
    put_batch = put or jax.device_put
    if size <= 0:
        yield from (put_batch(b) for b in batches)
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    _END = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for batch in batches:
                if not put(put_batch(batch)):
                    return
            put(_END)
        except BaseException as e:  # surfaced in the consumer thread
            put(e)

    thread = threading.Thread(target=work, daemon=True, name="jaxmint-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def check_input_range(values, bounds: tuple[int, int], where: str) -> None:
    """`DataError` if integer ``values`` (such as token ids) fall outside ``[low, high)``."""
    found = outside_range(values, bounds)
    if found is not None:
        lo, hi, first = found
        low, high = bounds
        raise DataError(
            f"{where} holds model inputs outside [{low}, {high}) (min {lo}, max {hi}; the "
            f"first at index {first}): the model takes ids below {high}, such as the tokens "
            "of its vocabulary. Fix the data, or build the model with a larger vocabulary"
        )
