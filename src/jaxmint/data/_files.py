"""The record-source protocol, and ``.npy`` shards: the file format `fit` reads fastest.

Each source is a Grain random-access data source: ``len(source)`` records, and
``source[i]`` is one example as a dict of numpy arrays. Files are untrusted
input: names are confined to their folder, headers and sizes are checked when
the source opens (before anything compiles), and every record carries a checksum
checked when it is read, so a damaged file is named with the record that shows it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxmint.data._loader import DataError, check_arrays

MANIFEST = "jaxmint_shards.json"
"""The index of a folder of ``.npy`` shards: keys, shapes, dtypes, files and row counts."""

FORMAT = "jaxmint-npy-shards/1"
_MAP_FROM_ROWS = 8  # a batch's rows in one unmapped shard: fewer are read, more mapped
_OPEN_FILES = 64
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

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records at ``indices``, stacked into a batch (sources override it with a
        vectorized read: the pipeline reads a batch at a time)."""
        records = [self[int(i)] for i in indices]
        return {k: np.stack([r[k] for r in records]) for k in records[0]}


def _open_file(path: Path):
    return open(path, "rb", buffering=0)


class OpenFiles:
    """The ``size`` most recently used opened things (memory maps, decoded row groups),
    shared by Grain's reader threads; what falls out is released (unmapped) once
    no batch holds it. Pickled empty, for worker processes."""

    def __init__(self, size: int, open_fn):
        self.size, self.open_fn = max(1, size), open_fn
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def has(self, key) -> bool:
        return key in self._items

    def get(self, index: int):
        with self._lock:
            item = self._items.get(index)
            if item is not None:
                self._items.move_to_end(index)
                return item
        item = self.open_fn(index)  # outside the lock: threads open different files at once
        with self._lock:
            self._items[index] = item
            self._items.move_to_end(index)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return item

    def __getstate__(self) -> dict:
        return {"size": self.size, "open_fn": self.open_fn}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"], state["open_fn"])


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
    record's checksum is checked the first time this process reads it
    (``verify=False`` skips it).
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
        self._offsets: dict[str, int] = {}  # file -> where its data starts
        for shard in self.shards:
            for key in self.keys:
                shape, dtype = self.spec[key]
                self._check_file(shard["files"][key], (shard["rows"], *shape), dtype)
            self._check_file(shard["crc"], (shard["rows"], len(self.keys)), np.dtype(np.uint32))
        self._maps = OpenFiles(self.max_open, self._open_shard)
        self._fds = OpenFiles(_OPEN_FILES, _open_file)
        self._checked: dict[int, np.ndarray] = {}  # shard -> rows whose checksum passed

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
        self._offsets[name] = offset
        want = offset + int(np.prod(shape)) * dtype.itemsize
        size = file.stat().st_size
        if size != want:
            raise DataError(
                f"{file} has {size} bytes, {want} expected for shape {tuple(shape)} of {dtype}: "
                "the file is truncated or damaged; write the dataset again"
            )

    def __len__(self) -> int:
        return self._length

    def _open_shard(self, index: int) -> dict[str, np.ndarray]:
        shard = self.shards[index]
        return {
            # a plain array over the map: indexing skips np.memmap's per-call bookkeeping
            name: np.asarray(np.load(self._file(file), mmap_mode="r", allow_pickle=False))
            for name, file in [*shard["files"].items(), ("crc", shard["crc"])]
        }

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"record {index} of {self._length}")
        return {k: v[0] for k, v in self.read(np.array([index])).items()}

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records at ``indices`` as a batch: one gather per shard and key, and each
        row's checksum checked."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._length):
            raise IndexError(f"records {indices.min()}..{indices.max()} of {self._length}")
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        rows = indices - np.asarray(self._starts)[shard_of]
        n = len(indices)
        out = {k: np.empty((n, *shape), dtype) for k, (shape, dtype) in self.spec.items()}
        want = np.empty((n, len(self.keys)), np.uint32)
        shards = np.unique(shard_of)
        for shard in shards.tolist():
            where = slice(None) if len(shards) == 1 else np.flatnonzero(shard_of == shard)
            if len(rows[where]) < _MAP_FROM_ROWS and not self._maps.has(shard):
                self._pread(shard, rows[where], where, out, want)  # cheaper than a new map
                continue
            maps = self._maps.get(shard)
            for key in self.keys:
                out[key][where] = maps[key][rows[where]]
            want[where] = maps["crc"][rows[where]]
        if self.verify:
            self._verify(out, want, shard_of, rows, indices)
        return out

    def _pread(self, shard: int, rows, where, out, want) -> None:
        """Read a few rows of a shard that is not mapped, one ``pread`` each."""
        files = self.shards[shard]
        targets = [(files["files"][k], out[k]) for k in self.keys] + [(files["crc"], want)]
        for name, target in targets:
            file = self._fds.get(self._file(name))  # held here: closed once evicted and unused
            size = target[0].nbytes
            start = self._offsets[name]
            for i, row in zip(np.arange(len(target))[where].tolist(), rows.tolist(), strict=True):
                raw = os.pread(file.fileno(), size, start + row * size)
                target[i] = np.frombuffer(raw, target.dtype).reshape(target.shape[1:])

    def _verify(self, out, want, shard_of, rows, indices) -> None:
        """Check the checksums of the rows this process has not read before (a record is
        checked once per process: later epochs read it unchecked, at no cost)."""
        seen = np.empty(len(rows), bool)
        for shard in np.unique(shard_of).tolist():
            where = shard_of == shard
            seen[where] = self._seen(shard)[rows[where]]
        if seen.all():
            return
        todo = np.flatnonzero(~seen)
        out = {k: v[todo] for k, v in out.items()}
        want, shard_of, rows, indices = want[todo], shard_of[todo], rows[todo], indices[todo]
        self._check_rows(out, want, shard_of, rows, indices)
        for shard in np.unique(shard_of).tolist():
            self._seen(shard)[rows[shard_of == shard]] = True

    def _seen(self, shard: int) -> np.ndarray:
        seen = self._checked.get(shard)
        if seen is None:
            seen = self._checked.setdefault(shard, np.zeros(self.shards[shard]["rows"], bool))
        return seen

    def _check_rows(self, out, want, shard_of, rows, indices) -> None:
        n = len(indices)
        for j, key in enumerate(self.keys):
            size = out[key].itemsize * int(np.prod(out[key].shape[1:]))
            raw = memoryview(out[key]).cast("B")
            got = np.fromiter(
                (zlib.crc32(raw[i * size : (i + 1) * size]) for i in range(n)), np.uint32, n
            )
            bad = np.flatnonzero(got != want[:, j])
            if bad.size:
                i = bad[0]
                file = self.path / self.shards[shard_of[i]]["files"][key]
                raise DataError(
                    f"{file}: record {rows[i]} (example {indices[i]}) does not match its "
                    "checksum; the file is damaged: write the dataset again from its source"
                )

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
