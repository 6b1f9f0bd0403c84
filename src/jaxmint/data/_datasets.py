"""Datasets that ship with the machine: no download, ever."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np


def digits(*, test_fraction: float = 0.2, seed: int = 0, image: bool = False):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), split train/test.

    Returns ``(train, test)``, each ``{"x": float32, "y": int32}`` with pixels in
    [0, 1]; ``x`` is ``(N, 64)``, or ``(N, 8, 8, 1)`` with ``image=True``. The split
    is stratified-free but fixed by ``seed``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    if image:
        x = x.reshape(-1, 8, 8, 1)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return {"x": x[train], "y": y[train]}, {"x": x[test], "y": y[test]}


def stdlib_text(max_bytes: int = 4_000_000) -> bytes:
    """The Python standard library's own source, concatenated in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python source files found under {root}")
    return b"".join(chunks)[:max_bytes]


def stdlib_chars(seq_len: int = 128, *, max_bytes: int = 2_000_000, test_fraction: float = 0.05):
    """A byte-level language-modelling set from the standard library's source.

    Returns ``(train, test)`` of non-overlapping windows, each
    ``{"x": int32 (N, seq_len), "y": int32 (N, seq_len)}`` with ``y`` the next byte
    of ``x``; the vocabulary is the 256 byte values. The last ``test_fraction`` of
    the text is held out.
    """
    text = np.frombuffer(stdlib_text(max_bytes), dtype=np.uint8).astype(np.int32)
    n = (len(text) - 1) // seq_len
    x = text[: n * seq_len].reshape(n, seq_len)
    y = text[1 : n * seq_len + 1].reshape(n, seq_len)
    n_test = max(1, int(n * test_fraction))
    return {"x": x[:-n_test], "y": y[:-n_test]}, {"x": x[-n_test:], "y": y[-n_test:]}
