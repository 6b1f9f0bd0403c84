"""The Optuna study behind a sweep dir: storage, sampler, pruner, budget and heartbeats.

A sweep dir holds::

    sweep.json        the experiment, its config overrides, the spec, the budget
    journal.log       Optuna's journal (the default storage: a file, no server)
    sweep.lock        a lock file: asking for a trial and counting the budget is atomic
    heartbeats/N.json one per running trial, rewritten by its worker every few seconds
    trials/S/         the run dir of trial slot S (a requeued trial keeps its slot)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from jaxmint.sweep._space import Spec, SweepError

STUDY_NAME = "sweep"
SLOT = "slot"  # user attr: which trials/<slot> run dir a trial trains in
ATTEMPT = "attempt"  # user attr: 1 for a fresh trial, +1 each time it is requeued
REQUEUED = "requeued"  # user attr on a failed attempt that was re-enqueued (not counted)


def _optuna():
    try:
        import optuna
    except ImportError:  # pragma: no cover - optuna is a dependency
        raise SweepError("sweeps need optuna: pip install 'jaxmint[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_for(sweep_dir: Path, url: str | None = None):
    """An Optuna storage: the journal file in the sweep dir, or a database ``url``.

    SQLite is accepted with a 60-second lock timeout; never put it on a network
    filesystem (its locking is unreliable there; use the journal file or PostgreSQL).
    """
    optuna = _optuna()
    if url is None:
        path = str(sweep_dir / "journal.log")
        try:  # optuna >= 4.0
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            backend = JournalFileBackend(path, lock_obj=JournalFileOpenLock(path))
        except ImportError:  # optuna 3.x spells these differently
            from optuna.storages import JournalFileOpenLock, JournalFileStorage

            backend = JournalFileStorage(path, lock_obj=JournalFileOpenLock(path))
        return optuna.storages.JournalStorage(backend)
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:  # a server: replace a pooled connection it dropped (a restart) before using it
        engine_kwargs = {"pool_pre_ping": True}
    try:
        return _retrying_rdb(optuna)(url, engine_kwargs=engine_kwargs)
    except ImportError as e:  # the URL's driver, e.g. psycopg2 for postgresql://
        raise SweepError(
            f"the study storage {masked(url)} needs a database driver that is not installed "
            f"({e}); for PostgreSQL: pip install 'jaxmint[postgres]'"
        ) from None
    except Exception as e:  # sqlalchemy's errors, as optuna raises them or wraps them
        if not _database_error(e):
            raise
        raise SweepError(
            f"cannot reach the study storage {masked(url)}: {_first_line(e)}. Start the "
            "database server or fix --storage"
        ) from None


STORAGE_PATIENCE_S = 120.0  # how long a worker waits out an unreachable database


def _patience_s() -> float:
    """`STORAGE_PATIENCE_S`, or ``$JAXMINT_SWEEP_STORAGE_PATIENCE_S``."""
    text = os.environ.get("JAXMINT_SWEEP_STORAGE_PATIENCE_S", "").strip()
    try:
        return float(text) if text else STORAGE_PATIENCE_S
    except ValueError:
        raise SweepError(
            f"$JAXMINT_SWEEP_STORAGE_PATIENCE_S must be a number of seconds, got {text!r}"
        ) from None


def masked(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _database_error(e: BaseException) -> bool:
    import sqlalchemy.exc

    return any(isinstance(x, sqlalchemy.exc.SQLAlchemyError) for x in (e, e.__cause__))


def _transient(optuna, e: BaseException) -> bool:
    """A lost or refused connection (retry), not a bad query (raise)."""
    import sqlalchemy.exc

    lost = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
    if isinstance(e, optuna.exceptions.StorageInternalError):
        e = e.__cause__ or e
    return isinstance(e, lost) or getattr(e, "connection_invalidated", False)


def _retrying_rdb(optuna):
    """Optuna's RDBStorage whose calls wait out a database that went away (a restart, a
    failover) for up to `STORAGE_PATIENCE_S` (``$JAXMINT_SWEEP_STORAGE_PATIENCE_S``),
    instead of failing the trial.

    A call that failed on a lost connection did not commit (its transaction rolled
    back), so it is safe to repeat. Creating the storage is not retried: a database
    that cannot be reached at the start is an error the user fixes.
    """
    log = logging.getLogger("jaxmint.sweep")
    patience = _patience_s()

    def patient(method):
        def call(self, *args, **kwargs):
            start, delay = time.monotonic(), 0.25
            while True:
                try:
                    return method(self, *args, **kwargs)
                except Exception as e:
                    waited = time.monotonic() - start
                    if not _transient(optuna, e) or waited > patience:
                        raise
                    log.warning(
                        "study storage unreachable (%s); retrying %s for %.0f s more",
                        _first_line(e),
                        method.__name__,
                        patience - waited,
                    )
                    time.sleep(delay)
                    delay = min(2 * delay, 5.0)

        call.__name__ = method.__name__
        return call

    base = optuna.storages.RDBStorage
    api = {
        name: patient(getattr(base, name))
        for name in dir(optuna.storages.BaseStorage)
        if not name.startswith("_") and callable(getattr(base, name, None))
    }
    return type("PatientRDBStorage", (base,), api)


def sampler_for(spec: Spec, worker: int = 0):
    """The spec's sampler, seeded with ``spec.seed + worker`` so workers draw differently."""
    optuna = _optuna()
    seed = spec.seed + worker
    opts = dict(spec.sampler_options)
    if spec.sampler == "grid":

        class Grid(optuna.samplers.GridSampler):
            # GridSampler stops `study.optimize` when the grid is used up; workers use
            # ask/tell and stop on the budget instead (study.stop() would raise here).
            def after_trial(self, study, trial, state, values) -> None:
                pass

        return Grid(spec.grid(), seed=seed, **opts)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed, **opts)
    return optuna.samplers.TPESampler(seed=seed, **opts)


def pruner_for(spec: Spec):
    optuna = _optuna()
    opts = dict(spec.pruner_options)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(**opts)
    if spec.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(**opts)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(**opts)
    return optuna.pruners.NopPruner()


def open_study(sweep_dir: Path, spec: Spec, storage: str | None = None, worker: int = 0):
    """Create the sweep's study, or load it when the sweep is continued."""
    optuna = _optuna()
    return optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage_for(sweep_dir, storage),
        sampler=sampler_for(spec, worker),
        pruner=pruner_for(spec),
        direction=spec.direction,
        load_if_exists=True,
    )


def read_state(sweep_dir: Path) -> dict:
    """``sweep.json``: what the sweep runs (written by `write_state`)."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        raise SweepError(
            f"{sweep_dir} is not a sweep dir (no sweep.json); start one with "
            "`jaxmint sweep EXPERIMENT.py --sweep-dir DIR`"
        )
    return json.loads(path.read_text())


def write_state(sweep_dir: Path, state: dict) -> None:
    """Save the sweep's definition; refuse to mix two different sweeps in one dir."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("experiment", "overrides", "spec", "storage"):
            if old.get(key) != state.get(key):
                raise SweepError(
                    f"{sweep_dir} holds a sweep with a different {key}: {old.get(key)!r}, not "
                    f"{state.get(key)!r}. Continue it with the same arguments, or pick another "
                    "--sweep-dir"
                )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(sweep_dir: Path, grace_s: int = 30):
    """Hold the sweep dir's lock (a lock file that works on NFS; a dead holder expires)."""
    path = str(sweep_dir / "sweep.lock")
    try:
        from optuna.storages.journal import JournalFileOpenLock
    except ImportError:  # optuna 3.x
        from optuna.storages import JournalFileOpenLock
    lock = JournalFileOpenLock(path, grace_period=grace_s)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def counted(trials) -> list:
    """The trials that take a slot of the budget (requeued attempts are not counted)."""
    return [t for t in trials if not t.user_attrs.get(REQUEUED)]


def slot_of(trial) -> int:
    """The trial's slot in the budget: its run dir is ``trials/<slot>``."""
    return int(trial.user_attrs.get(SLOT, trial.number))


# -- heartbeats ------------------------------------------------------------------


def heartbeat_path(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / "heartbeats" / f"{number}.json"


class Heartbeat:
    """A thread that rewrites ``heartbeats/<trial>.json`` every ``interval_s`` seconds."""

    def __init__(self, sweep_dir: Path, number: int, worker: int, interval_s: float):
        self.path = heartbeat_path(sweep_dir, number)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "worker": worker}
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.info, "time": time.time()}))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError):
                self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.path.unlink()


def last_beat(sweep_dir: Path, trial) -> float:
    """When the trial's worker last showed life (its start if it never wrote a heartbeat)."""
    try:
        return float(json.loads(heartbeat_path(sweep_dir, trial.number).read_text())["time"])
    except (OSError, ValueError, KeyError):
        start = trial.datetime_start
        return start.timestamp() if start is not None else time.time()


def requeue(study, storage, trial, reason: str) -> None:
    """Mark ``trial`` failed and enqueue its parameters again, in the same slot (run dir).

    The re-run trains in the same run dir, so `fit` resumes from its last checkpoint.
    """
    optuna = _optuna()
    storage.set_trial_user_attr(trial._trial_id, REQUEUED, reason)
    study.enqueue_trial(
        dict(trial.params),
        user_attrs={SLOT: slot_of(trial), ATTEMPT: int(trial.user_attrs.get(ATTEMPT, 1)) + 1},
    )
    with contextlib.suppress(Exception):  # it may have finished meanwhile
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def requeue_stale(study, sweep_dir: Path, stale_after_s: float) -> list[int]:
    """Requeue every running trial whose heartbeat is older than ``stale_after_s``."""
    optuna = _optuna()
    now, done = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        age = now - last_beat(sweep_dir, t)
        if age > stale_after_s:
            requeue(study, study._storage, t, f"no heartbeat for {age:.0f}s (worker lost)")
            with contextlib.suppress(OSError):
                heartbeat_path(sweep_dir, t.number).unlink()
            done.append(t.number)
    return done


def summary(trials) -> dict[str, Any]:
    """Counts of the budget's slots by state."""
    out: dict[str, int] = {}
    for t in counted(trials):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out
