"""A deterministic in-memory loader and the checks every batch goes through."""

from __future__ import annotations

import itertools
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


class TrainData:
    """What `fit` reads: a dict of arrays (an `ArrayLoader`), a record source or Grain
    dataset (a `GrainData`, whose iterator state each checkpoint stores), or an
    iterable of batches.

    ``first`` is the first batch (for shapes and initialization), ``batches(step)``
    the batches from ``step`` on, checked against the first one, and
    ``position(step)`` what a checkpoint records to continue on the same batch.
    With several processes, array data yields this process's rows of each global
    batch; an iterable must itself yield this process's share.
    """

    def __init__(
        self,
        data,
        batch_size: int,
        *,
        seed: int,
        shard: tuple[int, int] = (0, 1),
        workers: int = 0,
    ):
        from jaxmint.data._files import RecordSource
        from jaxmint.data._grain import GrainData, is_grain

        if isinstance(data, np.ndarray | jax.Array):
            raise DataError(
                f"data is a single array of shape {np.shape(data)}; pass a dict of arrays such "
                "as {'x': inputs, 'y': labels} (or an iterable of such dicts)"
            )
        self.loader = self.grain = None
        if isinstance(data, RecordSource) or is_grain(data):
            self.grain = GrainData(data, batch_size, seed=seed, shard=shard, workers=workers)
            self.first = self.grain.first
        elif isinstance(data, Mapping):
            self.loader = ArrayLoader(data, batch_size, seed=seed, shard=shard)
            self.first = next(self.loader.batches(0))
        elif isinstance(data, Iterable):
            self._iterator = iter(data)
            try:
                self.first = next(self._iterator)
            except StopIteration:
                raise DataError("data is an empty iterable: it yielded no batch") from None
        else:
            raise DataError(
                f"data must be a dict of numpy arrays, a record source (jaxmint.data.NpyShards, "
                f"...), a Grain dataset or an iterable of batches, got {type(data).__name__}"
            )
        self.spec = BatchSpec(self.first)

    def whole_or_first(self, key: str) -> np.ndarray:
        """All of array data's ``key`` (checked once at start), or the first batch's for
        an iterable (whose later batches are not read ahead)."""
        return self.loader.arrays[key] if self.loader is not None else np.asarray(self.first[key])

    def batches(self, start_step: int) -> Iterator[Batch]:
        if self.loader is not None:
            return self.loader.batches(start_step)
        if self.grain is not None:
            return self._checked(self.grain.batches(start_step))
        # An iterable cannot be rewound: resuming skips the batches already used.
        rest = itertools.chain([self.first], self._iterator)
        return self._checked(itertools.islice(rest, start_step, None))

    def _checked(self, batches):
        for i, batch in enumerate(batches):
            self.spec.check(batch, what=f"batch {i}")
            yield batch

    def iterator_state(self, step: int) -> bytes | None:
        """A Grain iterator's state after the batch of ``step`` (None for other data)."""
        return None if self.grain is None else self.grain.state_after(step)

    def resume_iterator(self, state: bytes | None) -> None:
        """Continue a Grain iterator from the ``state`` a checkpoint stored."""
        if self.grain is not None:
            self.grain.resume_from(state)

    def position(self, step: int) -> dict:
        if self.grain is not None:
            return {"batches_consumed": step, "iterator": "grain"}
        if self.loader is None:
            return {"batches_consumed": step}
        epoch, index = self.loader.position(step)
        return {"epoch": epoch, "index": index}

    def check_eval(self, eval_data) -> None:
        """Raise `DataError` unless ``eval_data`` has the training batches' keys and shapes."""
        if not isinstance(eval_data, Mapping):
            raise DataError(f"eval_data must be a dict of arrays, got {type(eval_data).__name__}")
        for key, (shape, dtype) in self.spec.spec.items():
            if key not in eval_data:
                raise DataError(
                    f"eval_data has no key {key!r}; the training batches have keys "
                    f"{sorted(self.spec.spec)}"
                )
            got = np.asarray(eval_data[key])
            if got.shape[1:] != shape[1:] or got.dtype != dtype:
                raise DataError(
                    f"eval_data[{key!r}] has per-example shape {got.shape[1:]} and dtype "
                    f"{got.dtype}, but training batches have {shape[1:]} and {dtype}"
                )
