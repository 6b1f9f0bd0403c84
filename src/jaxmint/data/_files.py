"""File-backed record sources (``.npy`` shards, ArrayRecord, Parquet) and their writers.

Each source is a Grain random-access data source: ``len(source)`` records, and
``source[i]`` is one example as a dict of numpy arrays. Files are untrusted
input: names are confined to their folder, headers and sizes are checked when
the source opens (before anything compiles), and every record carries a checksum
checked when it is read, so a damaged file is named with the record that shows it.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from jaxmint._extras import require
from jaxmint.data._loader import DataError, check_arrays

MANIFEST = "jaxmint_shards.json"
"""The index of a folder of ``.npy`` shards: keys, shapes, dtypes, files and row counts."""

FORMAT = "jaxmint-npy-shards/1"
MAX_MANIFEST_BYTES = 64 << 20


def _numeric(dtype: np.dtype, where: str) -> np.dtype:
    if dtype.hasobject or dtype.kind not in "biufc":
        raise DataError(f"{where} has dtype {dtype}; only numeric and bool arrays can be stored")
    return dtype


class RecordSource:
    """A random-access source of examples (the protocol of Grain's data sources).

    `jaxmint.fit` builds its Grain pipeline from one: shuffled each epoch from the
    seed, this process's share of each global batch, batched, read by threads or
    worker processes (see `jaxmint.data.pipeline`).
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


# -- .npy shards ------------------------------------------------------------------


def write_npy_shards(
    arrays: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    rows_per_shard: int = 65536,
    overwrite: bool = False,
) -> NpyShards:
    """Write a dict of arrays (sharing a leading example axis) as a folder of ``.npy`` shards.

    Each key gets one file per shard (``x-00000.npy``, ...), each shard a file of
    per-record, per-key CRC32 checksums, and the folder a ``jaxmint_shards.json``
    manifest. The arrays may be memory maps larger than memory: they are copied one
    shard at a time. The folder is written beside its destination and renamed into
    place, so a crash leaves no half-written dataset; an existing folder is kept
    unless ``overwrite``.

    Example::

        write_npy_shards({"x": x, "y": y}, "data/train", rows_per_shard=10_000)
        source = NpyShards("data/train")
    """
    n = check_arrays(arrays)
    if rows_per_shard < 1:
        raise DataError(f"rows_per_shard must be positive, got {rows_per_shard}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    keys = sorted(arrays)
    for key in keys:
        if not key.isidentifier():
            raise DataError(f"key {key!r} cannot name a file; use letters, digits and _")
        _numeric(np.asarray(arrays[key][:0]).dtype, f"arrays[{key!r}]")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = []
    for index, start in enumerate(range(0, n, rows_per_shard)):
        stop = min(start + rows_per_shard, n)
        files, crcs = {}, []
        for key in keys:
            block = np.ascontiguousarray(arrays[key][start:stop])
            files[key] = f"{key}-{index:05d}.npy"
            np.save(tmp / files[key], block, allow_pickle=False)
            crcs.append(_row_crcs(block))
        crc_file = f"crc-{index:05d}.npy"
        np.save(tmp / crc_file, np.stack(crcs, axis=1), allow_pickle=False)
        shards.append({"rows": stop - start, "files": files, "crc": crc_file})
    spec = {
        k: {"dtype": np.asarray(arrays[k][:0]).dtype.str, "shape": list(np.shape(arrays[k])[1:])}
        for k in keys
    }
    manifest = {"format": FORMAT, "num_records": n, "keys": spec, "shards": shards}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return NpyShards(path)


def _row_crcs(block: np.ndarray) -> np.ndarray:
    rows = block.reshape(len(block), -1).view(np.uint8) if block.size else block
    return np.array([zlib.crc32(r.tobytes()) for r in rows], np.uint32).reshape(len(block))


class NpyShards(RecordSource):
    """A folder of ``.npy`` shards (`write_npy_shards`), read by memory map.

    At most ``max_open`` shards are mapped at once (the least recently used is
    unmapped), so a dataset larger than the process's address space is read. Each
    record's checksum is checked as it is read (``verify=False`` skips it).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, max_open: int = 8):
        self.path = Path(path)
        self.verify, self.max_open = verify, max(1, max_open)
        manifest = _read_manifest(self.path)
        self.spec = {
            key: (tuple(int(d) for d in v["shape"]), np.dtype(v["dtype"]))
            for key, v in manifest["keys"].items()
        }
        self.keys = sorted(self.spec)
        self.shards = manifest["shards"]
        rows = [int(s["rows"]) for s in self.shards]
        self._starts = np.concatenate([[0], np.cumsum(rows)]).tolist()
        self._length = self._starts[-1]
        if self._length != manifest["num_records"]:
            raise DataError(
                f"{self.path / MANIFEST}: the shards hold {self._length} records, the manifest "
                f"says {manifest['num_records']}; the folder is damaged, write it again"
            )
        for shard in self.shards:
            for key in self.keys:
                shape, dtype = self.spec[key]
                self._check_file(shard["files"][key], (shard["rows"], *shape), dtype)
            self._check_file(shard["crc"], (shard["rows"], len(self.keys)), np.dtype(np.uint32))
        self._maps: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def _file(self, name: str) -> Path:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{self.path / MANIFEST} names the file {name!r} outside its folder")
        return self.path / name

    def _check_file(self, name: str, shape: tuple, dtype: np.dtype) -> None:
        """Header and size of one shard file, read without mapping it."""
        file = self._file(name)
        try:
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    header = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    header = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
                offset = f.tell()
        except FileNotFoundError:
            raise DataError(f"{file} is missing; the dataset is incomplete") from None
        except (ValueError, OSError) as e:
            raise DataError(f"{file} is not a readable .npy file ({e})") from None
        got_shape, fortran, got_dtype = header
        if got_shape != tuple(shape) or got_dtype != dtype or fortran:
            raise DataError(
                f"{file} holds shape {got_shape} and dtype {got_dtype}; the manifest says "
                f"shape {tuple(shape)} and dtype {dtype}"
            )
        want = offset + int(np.prod(shape)) * dtype.itemsize
        size = file.stat().st_size
        if size != want:
            raise DataError(
                f"{file} has {size} bytes, {want} expected for shape {tuple(shape)} of {dtype}: "
                "the file is truncated or damaged; write the dataset again"
            )

    def __len__(self) -> int:
        return self._length

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        maps = self._maps.get(index)
        if maps is not None:
            self._maps.move_to_end(index)
            return maps
        shard = self.shards[index]
        maps = {
            name: np.load(self._file(file), mmap_mode="r", allow_pickle=False)
            for name, file in [*shard["files"].items(), ("crc", shard["crc"])]
        }
        self._maps[index] = maps
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)  # unmapped when its arrays are released
        return maps

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"record {index} of {self._length}")
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        maps = self._shard(shard)
        record = {key: np.array(maps[key][row]) for key in self.keys}
        if self.verify:
            crcs = maps["crc"][row]
            for j, key in enumerate(self.keys):
                if zlib.crc32(record[key].tobytes()) != int(crcs[j]):
                    file = self.path / self.shards[shard]["files"][key]
                    raise DataError(
                        f"{file}: record {row} (example {index}) does not match its checksum; "
                        "the file is damaged: write the dataset again from its source"
                    )
        return record

    def __getstate__(self) -> dict:  # sent to worker processes without its memory maps
        return {**self.__dict__, "_maps": OrderedDict()}

    def __repr__(self) -> str:
        return f"NpyShards({str(self.path)!r}, {self._length} records, keys {self.keys})"


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise DataError(
            f"{path} has no {MANIFEST}: write the shards with jaxmint.data.write_npy_shards "
            "or `jaxmint data convert`"
        )
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise DataError(f"{file} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    try:
        manifest = json.loads(file.read_text())
        need(manifest["format"] == FORMAT, f"format {manifest.get('format')!r}, not {FORMAT}")
        need(isinstance(manifest["num_records"], int), "num_records is not an integer")
        keys = manifest["keys"]
        need(isinstance(keys, dict) and bool(keys), "no keys")
        for key, v in keys.items():
            need(key.isidentifier(), f"key {key!r}")
            need(all(isinstance(d, int) and d >= 0 for d in v["shape"]), f"shape of {key!r}")
            _numeric(np.dtype(v["dtype"]), f"key {key!r}")
        for shard in manifest["shards"]:
            need(isinstance(shard["rows"], int) and shard["rows"] >= 0, "rows of a shard")
            need(sorted(shard["files"]) == sorted(keys), "a shard's files differ from the keys")
            need(isinstance(shard["crc"], str), "a shard's crc file")
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{file} is not a valid shard manifest ({type(e).__name__}: {e})") from None
    return manifest


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
    """Write a dict of arrays as one Parquet file: a column per key (a fixed-size list
    for arrays, their shapes in the schema's metadata), with page checksums."""
    pa = require("pyarrow", "data", "Parquet files")
    pq = require("pyarrow.parquet", "data", "Parquet files")

    check_arrays(arrays)
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    columns, shapes = {}, {}
    for key, value in arrays.items():
        value = np.asarray(value)
        _numeric(value.dtype, f"arrays[{key!r}]")
        shapes[key] = list(value.shape[1:])
        if value.ndim == 1:
            columns[key] = pa.array(value)
        else:
            flat = pa.array(value.reshape(-1))
            columns[key] = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(value.shape[1:])))
    table = pa.table(columns).replace_schema_metadata({_SHAPES: json.dumps(shapes).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=rows_per_group, write_page_checksum=True)
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
        cache_groups: int = 4,
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
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self._starts[-1]

    def _group(self, index: int) -> dict[str, np.ndarray]:
        pq = require("pyarrow.parquet", "data", "Parquet files")

        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
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
        self._cache[index] = out
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        group = bisect.bisect_right(self._starts, index) - 1
        rows = self._group(group)
        return {k: np.array(v[index - self._starts[group]]) for k, v in rows.items()}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.files)} files, {len(self)} records, {self.columns})"
