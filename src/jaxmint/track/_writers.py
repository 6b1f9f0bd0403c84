"""Where metrics go: a JSON-lines file, TensorBoard event files and a live progress bar."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _clean(value: Any) -> Any:
    """JSON-safe value: non-finite floats become strings JSON readers understand."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    return value


class JsonlWriter:
    """Appends one JSON object per logged step to a file, flushed each time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a metrics file written by `JsonlWriter` back into a list of dicts.

    For a run directory, ask it: ``jaxmint.run.RunDir(path).metrics()``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory; read_metrics takes a metrics file. For a run dir use "
            f"jaxmint.run.RunDir({str(path)!r}).metrics()"
        )
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(
                    {
                        k: float(v) if v in ("nan", "inf", "-inf") else v
                        for k, v in json.loads(line).items()
                    }
                )
    return records


class TensorBoardWriter:
    """Scalars to TensorBoard event files through tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=10)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class ProgressBar:
    """A rich progress bar with steps/s and the current loss; silent when disabled."""

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True):
        self.enabled = enabled
        self._progress = None
        if not enabled:
            return

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} steps/s"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(
            "train", total=total, completed=start, rate="-", loss="-"
        )
        self._progress.start()
        self._last = (time.perf_counter(), start)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def show(self, step: int, loss: float) -> None:
        if self._progress is None:
            return
        now = time.perf_counter()
        t0, s0 = self._last
        rate = (step - s0) / max(now - t0, 1e-9)
        self._last = (now, step)
        self._progress.update(self._task, completed=step, rate=f"{rate:.1f}", loss=f"{loss:.4g}")

    def print(self, *args) -> None:
        if self._progress is not None:
            self._progress.console.print(*args)
        else:
            print(*args)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
