"""Text corpora read as byte windows straight from their files."""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import numpy as np

from jaxmint.data._files import OpenFiles, RecordSource
from jaxmint.data._loader import DataError


class ByteWindows(RecordSource):
    """A byte-level language-modelling set read straight from text files by memory map.

    Record ``i`` is ``{"x": int32 (seq_len,), "y": int32 (seq_len,)}``: a window of
    a file's bytes and the next byte of each. Windows never cross files and do not
    overlap. ``path`` is a file, a list of files, or a folder (its files matching
    ``pattern``, recursively, in sorted order). ``split=(start, stop)`` keeps the
    windows from fraction ``start`` to ``stop`` of the whole, such as ``(0, 0.95)``
    for training and ``(0.95, 1)`` for evaluation.
    """

    def __init__(
        self,
        path: str | os.PathLike | list[str | os.PathLike],
        seq_len: int,
        *,
        pattern: str = "*",
        split: tuple[float, float] = (0.0, 1.0),
        max_open: int = 8,
    ):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        if isinstance(path, list | tuple):
            files = [Path(p) for p in path]
        elif Path(path).is_dir():
            files = sorted(p for p in Path(path).rglob(pattern) if p.is_file())
        else:
            files = [Path(path)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"no such file: {', '.join(missing[:3])}")
        counts = [max(0, (f.stat().st_size - 1) // seq_len) for f in files]
        kept = [(f, c) for f, c in zip(files, counts, strict=True) if c]
        if not kept:
            raise DataError(
                f"{path} holds no file longer than seq_len + 1 = {seq_len + 1} bytes"
                + ("" if files else f" (no file matches {pattern!r})")
            )
        self.files = [f for f, _ in kept]
        self.seq_len, self.max_open = seq_len, max(1, max_open)
        self._starts = np.concatenate([[0], np.cumsum([c for _, c in kept])]).tolist()
        total = self._starts[-1]
        lo, hi = split
        if not 0 <= lo < hi <= 1:
            raise DataError(f"split must be (start, stop) with 0 <= start < stop <= 1, got {split}")
        self._first, self._stop = int(total * lo), int(total * hi)
        if self._stop <= self._first:
            raise DataError(f"split {split} of {total} windows in {path} is empty")
        self._maps = OpenFiles(self.max_open, self._open)

    def __len__(self) -> int:
        return self._stop - self._first

    def _open(self, index: int) -> np.ndarray:
        return np.memmap(self.files[index], np.uint8, mode="r")

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        window = self._first + index
        file = bisect.bisect_right(self._starts, window) - 1
        start = (window - self._starts[file]) * self.seq_len
        data = self._maps.get(file)
        chunk = np.asarray(data[start : start + self.seq_len + 1], np.int32)
        return {"x": chunk[:-1], "y": chunk[1:]}

    def arrays(self, limit: int | None = None) -> dict[str, np.ndarray]:
        """The first ``limit`` windows (all by default) as a dict of arrays (for evaluation)."""
        n = len(self) if limit is None else min(limit, len(self))
        return {k: np.stack([self[i][k] for i in range(n)]) for k in ("x", "y")}

    def __repr__(self) -> str:
        return f"ByteWindows({len(self.files)} files, {len(self)} windows of {self.seq_len})"
