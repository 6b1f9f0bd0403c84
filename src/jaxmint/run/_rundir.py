"""`RunDir`: the one place that knows a run directory's files.

A run directory holds what a run wrote and what any later command needs::

    config.json          the experiment's config, fit's settings, versions, the loss's terms
    metrics.jsonl        one JSON record per logged step
    tb/                  TensorBoard event files
    checkpoints/         orbax steps (`jaxmint.checkpoint`)
    checkpoints.damaged/ unreadable steps set aside on resume (kept, never deleted)
    DEBUG_RUN            marks a run written by debug mode
    nonfinite.json       the first non-finite step of a run that stopped on one
    diagnosis/           the plots of ``jaxmint diagnose``

Every other module asks a `RunDir` for these instead of spelling the names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from jaxmint.checkpoint import CheckpointError, RunCheckpoints, read_state, read_weights
from jaxmint.config import from_dict
from jaxmint.run._script import load_module
from jaxmint.track import read_metrics

log = logging.getLogger("jaxmint")

DEBUG_MARKER = "DEBUG_RUN"
"""The file that marks a run dir as written by a debug run."""


class RunDirError(ValueError):
    """A path is not a usable run dir (no config, no experiment script); the message says why."""


class DebugRunError(RuntimeError):
    """A run dir written in debug mode was about to be resumed by a normal run, or vice versa."""


class RunDir:
    """A run directory; see the module docstring for its layout.

    ``experiment`` is the script that builds the run's experiment, recorded in
    ``config.json`` when the run starts, so that export, diagnosis and sweeps can
    rebuild the same model.
    """

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    EVENTS = "tb"
    CHECKPOINTS = "checkpoints"
    DAMAGED = "checkpoints.damaged"
    NONFINITE = "nonfinite.json"
    DIAGNOSIS = "diagnosis"

    def __init__(self, path: str | os.PathLike, *, experiment: str | os.PathLike | None = None):
        self.path = Path(path)
        self.experiment = str(Path(experiment).resolve()) if experiment else None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def of(cls, path) -> RunDir:
        """``path`` as a `RunDir` (a `RunDir` is returned as it is)."""
        return path if isinstance(path, RunDir) else cls(path)

    # -- paths -------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def events_dir(self) -> Path:
        return self.path / self.EVENTS

    @property
    def diagnosis_dir(self) -> Path:
        """Where ``jaxmint diagnose`` writes its plots."""
        return self.path / self.DIAGNOSIS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # -- config ------------------------------------------------------------------
    def read_config(self) -> dict:
        """The whole ``config.json`` (``{}`` when there is none yet)."""
        if not self.config_file.is_file():
            return {}
        try:
            return json.loads(self.config_file.read_text())
        except ValueError as e:
            raise RunDirError(f"{self.config_file} is not valid JSON ({e})") from None

    def as_recorded(self, record: dict) -> dict:
        """``record`` as `write_config` writes it: JSON values, the experiment script
        named in its config (compare this, not ``record``, with `read_config`)."""
        record = json.loads(json.dumps(record, default=str))
        if self.experiment:
            record.setdefault("config", {})["experiment"] = self.experiment
        return record

    def write_config(self, record: dict) -> None:
        """Write ``config.json`` atomically; the experiment script is recorded in it."""
        record = self.as_recorded(record)
        tmp = self.config_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.config_file)

    # -- metrics -----------------------------------------------------------------
    def metrics(self) -> list[dict]:
        """The logged records (``[]`` before the first log)."""
        return read_metrics(self.metrics_file) if self.metrics_file.exists() else []

    def require_metrics(self) -> list[dict]:
        """The logged records; `RunDirError` when this is not a run dir that logged any."""
        if not self.metrics_file.is_file():
            raise RunDirError(f"{self.path} is not a run dir (no {self.METRICS})")
        return self.metrics()

    def trim_metrics(self, step: int) -> None:
        """Drop logged records past ``step``: a resumed run writes them again."""
        path = self.metrics_file
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)

    def scores(self, metric: str) -> dict[int, float]:
        """``{step: value}`` of a logged metric, for the checkpoints' keep-best policy."""
        return {
            int(r["step"]): float(r[metric])
            for r in self.metrics()
            if isinstance(r.get(metric), int | float)
        }

    # -- checkpoints -------------------------------------------------------------
    def checkpoints(self, **keep) -> RunCheckpoints:
        """The run's `RunCheckpoints`; ``keep`` is its keep policy."""
        return RunCheckpoints(self.checkpoints_dir, damaged_dir=self.path / self.DAMAGED, **keep)

    def require_checkpoint_steps(self) -> list[int]:
        """The saved steps; `RunDirError` when this is not a run dir at all."""
        if not self.config_file.is_file() and not self.checkpoints_dir.is_dir():
            raise RunDirError(f"{self.path} is not a run dir (no {self.CONFIG}, no checkpoints)")
        return self.checkpoint_steps()

    def copy_checkpoint(self, source: RunDir, step: int) -> None:
        """Copy ``source``'s checkpoint of ``step`` (with its digest) into this run dir."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source.checkpoints_dir / str(step), self.checkpoints_dir / str(step))

    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoints_dir.is_dir():
            return []
        ckpt = self.checkpoints()
        try:
            return ckpt.steps()
        finally:
            ckpt.close()

    def best_step(self) -> int:
        """The kept step with the best logged value of the run's ``best_metric``."""
        settings = self.read_config().get("fit", {})
        metric = settings.get("best_metric", "eval/loss")
        available = set(self.checkpoint_steps())
        scores = {s: v for s, v in self.scores(metric).items() if s in available}
        if not scores:
            raise CheckpointError(
                f"no kept checkpoint of {self.path} has a logged {metric!r}; pass a step instead"
            )
        pick = max if settings.get("best_mode", "min") == "max" else min
        return pick(scores, key=scores.get)

    def load_params(self, step: int | str | None = None) -> tuple[dict, int]:
        """The weights at the latest step, a given ``step``, or ``"best"``: ``(weights, step)``."""
        if step == "best":
            step = self.best_step()
        return read_weights(self.checkpoints_dir, step)

    def read_state(self, step: int | None, target) -> tuple[dict, int]:
        """The saved train state at the latest step or ``step``, read only, shaped like
        ``target``: ``(state, step)``."""
        return read_state(self.checkpoints_dir, step, target)

    def move_aside(self) -> None:
        """``--fresh``: move checkpoints, metrics and events aside (nothing is deleted)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (self.CHECKPOINTS, self.METRICS, self.EVENTS):
            path = self.path / name
            if path.exists():
                path.rename(self.path / f"{name}.old-{stamp}")
                log.warning("moved %s aside to %s.old-%s (--fresh)", path, name, stamp)

    # -- debug runs --------------------------------------------------------------
    def recorded_debug(self) -> bool | None:
        """Whether this holds a debug run (True), a normal run (False), or nothing (None)."""
        if (self.path / DEBUG_MARKER).exists():
            return True
        try:
            config = self.read_config()
        except RunDirError:
            return None
        return bool(config.get("debug", False)) if config else None

    def check_kind(self, debug: bool, *, fresh: bool) -> None:
        """Refuse to resume a debug run as a normal one, or the other way round."""
        recorded = self.recorded_debug()
        if fresh or recorded is None or recorded == debug or not self.checkpoint_steps():
            return
        was, now = ("a debug run", "a normal run") if recorded else ("a normal run", "a debug run")
        raise DebugRunError(
            f"the run dir {self.path} holds checkpoints of {was}; {now} never resumes them, so "
            "the two are never mixed. Use another --workdir, or --fresh (fit(..., fresh=True)) to "
            "move the old checkpoints aside and start over."
        )

    def mark_debug(self, debug: bool) -> None:
        """Write (debug) or remove (normal) the debug marker file."""
        marker = self.path / DEBUG_MARKER
        if debug:
            marker.write_text(
                "This run dir was written by a debug run (un-jitted steps); a normal run will "
                "not resume its checkpoints.\n"
            )
        elif marker.exists():
            marker.unlink()

    # -- failures ----------------------------------------------------------------
    def write_nonfinite(self, record: dict[str, Any]) -> None:
        (self.path / self.NONFINITE).write_text(json.dumps(record) + "\n")

    def read_nonfinite(self) -> dict:
        path = self.path / self.NONFINITE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: the run did not stop on a non-finite value "
                "(only nonfinite='raise' records one)"
            )
        return json.loads(path.read_text())

    # -- the experiment ----------------------------------------------------------
    def load_experiment(self):
        """``(module, config, recorded)``: the run's experiment script, imported, and its config.

        The script's folder goes first on ``sys.path`` while it is imported, as
        ``python script.py`` does, so modules beside the script import.
        """
        if not self.config_file.is_file():
            raise RunDirError(f"{self.path} is not a run dir: it has no {self.CONFIG}")
        recorded = self.read_config().get("config", {})
        script = recorded.get("experiment")
        if not script:
            raise RunDirError(
                f"{self.config_file} records no experiment script (the run was not started "
                "from one); export from Python with jaxmint.export.export_model(model, "
                "variables, sample, out, ...)"
            )
        if not Path(script).is_file():
            raise RunDirError(f"the run's experiment script {script} no longer exists")
        module = load_module(script)
        return module, from_dict(module.Config, recorded), recorded


def load_params(workdir: str | os.PathLike, step: int | str | None = None) -> tuple[dict, int]:
    """A run's trained weights, without model code: ``(variables, step)``.

    ``step`` is None (the newest checkpoint), a step number, or ``"best"`` (the
    kept checkpoint with the best logged ``best_metric``). ``variables`` is
    ``{"params": ..., "model_state": ...}`` as numpy arrays; ``model_state`` is
    None for a model whose variables are all parameters.
    """
    return RunDir(workdir).load_params(step)
