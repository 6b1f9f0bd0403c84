"""Opening a dataset by what its folder holds, and converting between formats."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxmint.data._files import MANIFEST, NpyShards, RecordSource, write_npy_shards
from jaxmint.data._formats import (
    ArrayRecordSource,
    ParquetSource,
    write_array_record,
    write_parquet,
)
from jaxmint.data._loader import DataError


def open_source(path: str | os.PathLike) -> RecordSource:
    """The dataset at ``path``: `NpyShards` (a folder with a manifest), `ArrayRecordSource`
    (``.array_record`` files) or `ParquetSource` (``.parquet`` files), by what is there."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return NpyShards(path)
    if path.suffix == ".array_record" or (path.is_dir() and any(path.glob("*.array_record"))):
        return ArrayRecordSource(path)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return ParquetSource(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    raise DataError(
        f"{path} is not a dataset: expected a folder of .npy shards with {MANIFEST}, "
        ".array_record files or .parquet files"
    )


class _Column:
    """One key of a record source, sliced like an array (what the writers read)."""

    def __init__(self, source: RecordSource, key: str, example: np.ndarray):
        self.source, self.key = source, key
        self.shape = (len(source), *example.shape)
        self.dtype = example.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        indices = range(*rows.indices(len(self.source)))
        if not indices:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return np.stack([self.source[i][self.key] for i in indices])


def read_arrays(path: str | os.PathLike) -> Mapping[str, Any]:
    """What `jaxmint data convert` reads: a ``.npz`` file, a folder of ``KEY.npy`` files
    (memory-mapped), or a dataset (`open_source`), read a shard at a time when written."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except ValueError as e:
            raise DataError(f"{path} is not a readable .npz of numeric arrays ({e})") from None
    if path.is_dir() and not (path / MANIFEST).exists() and any(path.glob("*.npy")):
        try:
            return {
                f.stem: np.load(f, mmap_mode="r", allow_pickle=False)
                for f in sorted(path.glob("*.npy"))
            }
        except ValueError as e:
            raise DataError(f"{path}: a .npy file is not readable ({e})") from None
    source = open_source(path)
    if len(source) == 0:
        raise DataError(f"{path} holds no records")
    first = source[0]
    return {k: _Column(source, k, v) for k, v in first.items()}


WRITERS = {"npy": write_npy_shards, "arrayrecord": write_array_record, "parquet": write_parquet}


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "npy",
    rows_per_shard: int = 65536,
    overwrite: bool = False,
) -> RecordSource:
    """Write the arrays at ``source`` (`read_arrays`) as a dataset of ``format``
    (``npy``, ``arrayrecord`` or ``parquet``) at ``out``; returns the new source."""
    if format not in WRITERS:
        raise DataError(f"format {format!r} is not one of {sorted(WRITERS)}")
    if Path(out).resolve() == Path(source).resolve():
        raise DataError(f"{out} is the source itself; write to another path")
    arrays = read_arrays(source)
    if format == "parquet":
        return write_parquet(arrays, out, rows_per_group=rows_per_shard, overwrite=overwrite)
    return WRITERS[format](arrays, out, rows_per_shard=rows_per_shard, overwrite=overwrite)
