"""What `fit` reads: arrays, record sources, Grain datasets or iterables, behind one face."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping

import jax
import numpy as np

from jaxmint.data._files import RecordSource
from jaxmint.data._grain import GrainData, is_grain
from jaxmint.data._loader import ArrayLoader, Batch, BatchSpec, DataError


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

    def close(self) -> None:
        """Release what reading holds: a Grain pipeline's threads and worker processes."""
        if self.grain is not None:
            self.grain.close()

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
