"""ArrayRecord and Parquet files as record sources, and their writers."""

from __future__ import annotations

import bisect
import json
import os
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from jaxmint._extras import require
from jaxmint.data._files import OpenFiles, RecordSource, _numeric
from jaxmint.data._loader import DataError, check_arrays

# -- ArrayRecord ------------------------------------------------------------------
# A record is msgpack ``{key: [dtype, shape, bytes, crc32]}``: no pickle, and every
# field is checked before an array is built from the bytes.

MAX_RECORD_BYTES = 256 << 20


def _encode_record(example: Mapping[str, np.ndarray]) -> bytes:
    out = {}
    for key, value in example.items():
        value = np.asarray(value)
        raw = value.tobytes()  # C order whatever the layout
        out[key] = [value.dtype.str, list(value.shape), raw, zlib.crc32(raw)]
    return msgpack.packb(out, use_bin_type=True)


def _decode_record(raw: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(f"{len(raw)} bytes, more than {MAX_RECORD_BYTES >> 20} MiB")
        fields = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_RECORD_BYTES)
        if not isinstance(fields, dict) or not fields:
            raise ValueError("not a dict of arrays")
        record = {}
        for key, (dtype, shape, data, crc) in fields.items():
            dtype = _numeric(np.dtype(dtype), f"key {key!r}")
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"shape {shape} of {key!r}")
            if len(data) != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"{key!r} has {len(data)} bytes for shape {shape} of {dtype}")
            if zlib.crc32(data) != crc:
                raise ValueError(f"{key!r} does not match its checksum")
            record[key] = np.frombuffer(data, dtype).reshape(shape).copy()
        return record
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
        raise DataError(
            f"{where} is damaged ({type(e).__name__}: {e}); write the dataset again"
        ) from None


def write_array_record(
    arrays: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    rows_per_shard: int = 65536,
    overwrite: bool = False,
) -> ArrayRecordSource:
    """Write a dict of arrays as ArrayRecord files ``path/data-00000.array_record``, ...

    One record per example (msgpack of its arrays with a CRC32 each). Written beside
    the destination and renamed into place; an existing folder is kept unless
    ``overwrite``.
    """
    module = require("array_record.python.array_record_module", "data", "ArrayRecord files")
    ArrayRecordWriter = module.ArrayRecordWriter

    n = check_arrays(arrays)
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for index, start in enumerate(range(0, n, rows_per_shard)):
        writer = ArrayRecordWriter(str(tmp / f"data-{index:05d}.array_record"), "group_size:1")
        block = {k: np.asarray(v[start : start + rows_per_shard]) for k, v in arrays.items()}
        for row in range(len(next(iter(block.values())))):
            writer.write(_encode_record({k: v[row] for k, v in block.items()}))
        writer.close()
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return ArrayRecordSource(path)


class ArrayRecordSource(RecordSource):
    """ArrayRecord files (a folder of ``*.array_record``, or a list of files) through
    Grain's ``ArrayRecordDataSource``; each record is checked as it is decoded."""

    def __init__(self, path: str | os.PathLike | list[str | os.PathLike]):
        sources = require("grain.sources", "data", "ArrayRecord files")

        if isinstance(path, list | tuple):
            files = [Path(p) for p in path]
        elif Path(path).is_dir():
            files = sorted(Path(path).glob("*.array_record"))
        else:
            files = [Path(path)]
        if not files:
            raise DataError(f"{path} holds no .array_record files")
        for file in files:
            if not file.is_file():
                raise DataError(f"{file} is missing")
        self.files = files
        try:
            self._source = sources.ArrayRecordDataSource([str(f) for f in files])
            lengths = [self._file_length(f) for f in files]
        except DataError:
            raise
        except Exception as e:  # the C++ reader raises its own types
            raise DataError(f"{path}: not readable as ArrayRecord ({e})") from None
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        self._readers = OpenFiles(16, self._open_reader)

    @staticmethod
    def _file_length(file: Path) -> int:
        module = require("array_record.python.array_record_module", "data", "ArrayRecord files")
        try:
            reader = module.ArrayRecordReader(str(file))
        except Exception as e:
            raise DataError(f"{file} is not a readable ArrayRecord file ({e})") from None
        try:
            return reader.num_records()
        finally:
            reader.close()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        file = bisect.bisect_right(self._starts, index) - 1
        where = f"{self.files[file]}: record {index - self._starts[file]} (example {index})"
        try:
            raw = self._source[index]
        except Exception as e:  # the C++ reader raises its own types
            raise DataError(f"{where} cannot be read ({e}); the file is damaged") from None
        return _decode_record(raw, where)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records at ``indices`` as a batch: one batched read per file."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"records {indices.min()}..{indices.max()} of {len(self)}")
        file_of = np.searchsorted(self._starts, indices, side="right") - 1
        rows = (indices - np.asarray(self._starts)[file_of]).tolist()
        records: list = [None] * len(indices)
        for file in np.unique(file_of).tolist():
            where = np.flatnonzero(file_of == file).tolist()
            try:
                raws = self._readers.get(file).read([rows[i] for i in where])
            except Exception as e:  # the C++ reader raises its own types
                first = min(rows[i] for i in where)
                raise DataError(
                    f"{self.files[file]}: a record from {first} on cannot be read ({e}); the "
                    "file is damaged"
                ) from None
            for i, raw in zip(where, raws, strict=True):
                where_i = f"{self.files[file]}: record {rows[i]} (example {indices[i]})"
                records[i] = _decode_record(raw, where_i)
        return {k: np.stack([r[k] for r in records]) for k in records[0]}

    def _open_reader(self, file: int):
        module = require("array_record.python.array_record_module", "data", "ArrayRecord files")
        return module.ArrayRecordReader(str(self.files[file]), "readahead_buffer_size:0")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.files)} files, {len(self)} records)"


# -- Parquet ----------------------------------------------------------------------

_SHAPES = b"jaxmint.shapes"


def write_parquet(
    arrays: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    rows_per_group: int = 8192,
    overwrite: bool = False,
) -> ParquetSource:
    """Write a dict of arrays as one Parquet file, a row group at a time: a column per
    key (a fixed-size list for arrays, their shapes in the schema's metadata), with
    page checksums. Written beside the destination and renamed into place."""
    pa = require("pyarrow", "data", "Parquet files")
    pq = require("pyarrow.parquet", "data", "Parquet files")

    n = check_arrays(arrays)
    if rows_per_group < 1:
        raise DataError(f"rows_per_group must be positive, got {rows_per_group}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    shapes = {}
    for key in arrays:
        _numeric(np.asarray(arrays[key][:0]).dtype, f"arrays[{key!r}]")
        shapes[key] = list(np.shape(arrays[key])[1:])

    def table(start: int, stop: int):
        columns = {}
        for key in arrays:
            value = np.asarray(arrays[key][start:stop])
            if value.ndim == 1:
                columns[key] = pa.array(value)
            else:
                flat = pa.array(value.reshape(-1))
                size = int(np.prod(value.shape[1:]))
                columns[key] = pa.FixedSizeListArray.from_arrays(flat, size)
        return pa.table(columns).replace_schema_metadata({_SHAPES: json.dumps(shapes).encode()})

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    first = table(0, min(rows_per_group, n))
    with pq.ParquetWriter(tmp, first.schema, write_page_checksum=True) as writer:
        writer.write_table(first, row_group_size=rows_per_group)
        for start in range(rows_per_group, n, rows_per_group):
            writer.write_table(table(start, min(start + rows_per_group, n)))
    os.replace(tmp, path)
    return ParquetSource(path)


class ParquetSource(RecordSource):
    """Parquet files (one, a list, or a folder of ``*.parquet``) as random-access records.

    Numeric columns are scalars; list columns are arrays, shaped by the shapes that
    `write_parquet` records (or 1-D). Row groups are decoded whole and the last
    ``cache_groups`` kept, so shuffled reads cost a row group each: write small row
    groups, or convert to `NpyShards`, for random access at speed. Page checksums
    are verified when present.
    """

    def __init__(
        self,
        path: str | os.PathLike | list[str | os.PathLike],
        *,
        columns: list[str] | None = None,
        cache_groups: int = 16,
    ):
        pq = require("pyarrow.parquet", "data", "Parquet files")

        if isinstance(path, list | tuple):
            files = [Path(p) for p in path]
        elif Path(path).is_dir():
            files = sorted(Path(path).glob("*.parquet"))
        else:
            files = [Path(path)]
        if not files:
            raise DataError(f"{path} holds no .parquet files")
        self.files, self.cache_groups = files, max(1, cache_groups)
        self._groups: list[tuple[int, int]] = []  # (file, row group) in order
        starts, self.shapes = [0], None
        for i, file in enumerate(files):
            try:
                meta = pq.ParquetFile(file).metadata
                schema = pq.read_schema(file)
            except FileNotFoundError:
                raise DataError(f"{file} is missing") from None
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
                raise DataError(f"{file} is not a readable Parquet file ({e})") from None
            names = columns or schema.names
            missing = sorted(set(names) - set(schema.names))
            if missing:
                raise DataError(f"{file} has no column(s) {missing}; it has {schema.names}")
            shapes = json.loads((schema.metadata or {}).get(_SHAPES, b"{}"))
            shapes = {k: tuple(shapes.get(k, ())) for k in names}
            if self.shapes is not None and shapes != self.shapes:
                raise DataError(f"{file} has columns {shapes}, {files[0]} has {self.shapes}")
            self.shapes = shapes
            for g in range(meta.num_row_groups):
                self._groups.append((i, g))
                starts.append(starts[-1] + meta.row_group(g).num_rows)
        self.columns = list(self.shapes)
        self._starts = starts
        self._groups_cache = OpenFiles(self.cache_groups, self._read_group)

    def __len__(self) -> int:
        return self._starts[-1]

    def _read_group(self, index: int) -> dict[str, np.ndarray]:
        pq = require("pyarrow.parquet", "data", "Parquet files")

        file, group = self._groups[index]
        try:
            reader = pq.ParquetFile(self.files[file], page_checksum_verification=True)
            table = reader.read_row_group(group, columns=self.columns)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            first = self._starts[index]
            raise DataError(
                f"{self.files[file]}: row group {group} (examples {first} to "
                f"{self._starts[index + 1] - 1}) cannot be read ({e}); the file is damaged"
            ) from None
        out = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            rows = len(column)
            if hasattr(column, "flatten") and column.type.num_fields:
                values = column.flatten().to_numpy(zero_copy_only=False)
                shape = self.shapes[name] or (len(values) // max(rows, 1),)
                out[name] = values.reshape(rows, *shape)
            else:
                out[name] = column.to_numpy(zero_copy_only=False)
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        group = bisect.bisect_right(self._starts, index) - 1
        rows = self._groups_cache.get(group)
        return {k: np.array(v[index - self._starts[group]]) for k, v in rows.items()}

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records at ``indices`` as a batch: one gather per row group and column."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"records {indices.min()}..{indices.max()} of {len(self)}")
        group_of = np.searchsorted(self._starts, indices, side="right") - 1
        rows = indices - np.asarray(self._starts)[group_of]
        out = None
        for group in np.unique(group_of):
            where = np.flatnonzero(group_of == group)
            columns = self._groups_cache.get(int(group))
            if out is None:
                out = {
                    k: np.empty((len(indices), *v.shape[1:]), v.dtype) for k, v in columns.items()
                }
            for k, v in columns.items():
                out[k][where] = v[rows[where]]
        return out

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.files)} files, {len(self)} records, {self.columns})"
