"""The worker loop: pull a trial, train it in its run dir, report, until the budget is spent."""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from pathlib import Path

from jaxmint.config import parse
from jaxmint.run import load_module
from jaxmint.sweep import _study
from jaxmint.sweep._space import Spec, SweepError, apply, suggest
from jaxmint.train import Hook, fit_experiment


def load_sweep(experiment: str | Path):
    """Import an experiment script and call its ``sweep()``; returns ``(module, Spec)``."""
    module = load_module(experiment)
    if not hasattr(module, "sweep"):
        raise SweepError(
            f"{experiment} defines no sweep(); add `def sweep() -> jaxmint.sweep.Spec` "
            "next to its build() (see docs/sweeps.md)"
        )
    spec = module.sweep()
    if not isinstance(spec, Spec):
        raise SweepError(f"{experiment}: sweep() returned {type(spec).__name__}, not a Spec")
    spec.check_fields(module.Config)
    return module, spec


def base_config(module, overrides):
    """The experiment's config from the sweep's ``-- OVERRIDES`` (its own parser, --smoke too)."""

    return parse(module.Config, list(overrides), smoke=getattr(module, "SMOKE", None))


class ReportHook(Hook):
    """A `jaxmint.Hook` that reports the objective to Optuna and prunes bad trials.

    Raising ``optuna.TrialPruned`` from ``on_log`` unwinds `fit`, whose ``finally``
    closes the metric writers and the checkpoint manager.
    """

    def __init__(self, trial, objective: str):
        self.trial, self.objective = trial, objective

    def on_start(self, loop, state) -> None:
        if loop.start_step:  # a requeued trial picked up its checkpoint
            self.trial.set_user_attr("resumed_from_step", int(loop.start_step))

    def on_log(self, loop, step: int, state, batch, record: dict) -> None:
        if self.objective not in record:
            return
        value = float(record[self.objective])
        self.trial.report(value, step)
        if self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"pruned at step {step} ({self.objective}={value:.4g})")


def run_trial(trial, module, spec: Spec, base, sweep_dir: Path) -> float:
    """Build and train one trial in ``trials/<slot>``; returns the objective's last value."""
    params = suggest(trial, spec)
    slot = int(trial.user_attrs.get(_study.SLOT, trial.number))
    workdir = sweep_dir / "trials" / str(slot)
    workdir.mkdir(parents=True, exist_ok=True)
    config = apply(base, params, workdir=str(workdir), progress=False)
    (workdir / "trial.json").write_text(
        json.dumps({"trial": trial.number, "slot": slot, "params": params}, indent=2)
    )
    exp = module.build(config)
    result = fit_experiment(
        exp, config, script=module.__file__, hooks=[ReportHook(trial, spec.objective)]
    )
    value = None
    for record in reversed(result.history):
        if spec.objective in record:
            value = float(record[spec.objective])
            break
    if value is None:
        keys = sorted({k for r in result.history for k in r})
        raise SweepError(
            f"the objective {spec.objective!r} was never logged; logged keys are {keys}. "
            "Fix objective= in sweep(), or give the experiment eval data"
        )
    return value


def _tell(study, trial, worker: int, *args, **kwargs) -> None:
    try:
        study.tell(trial, *args, **kwargs)
    except Exception as e:  # e.g. requeued by another worker after a long stall
        print(
            f"[worker {worker}] trial {trial.number} was finished elsewhere ({e}); "
            "its result is dropped",
            flush=True,
        )


def run_worker(
    sweep_dir: str | Path,
    worker: int = 0,
    *,
    max_wait_s: float | None = None,
) -> dict:
    """Pull and run trials until every slot of the budget is finished; returns counts.

    Every trial counts against the budget, pruned and failed ones included, so the
    sweep never overshoots or loops. While others' trials are still running the
    worker waits (and requeues a trial whose heartbeat went stale), so a killed
    worker's trial is always finished by someone. ``max_wait_s`` bounds that wait.
    """
    optuna = _study._optuna()
    sweep_dir = Path(sweep_dir).resolve()
    state = _study.read_state(sweep_dir)
    module, spec = load_sweep(state["experiment"])
    base = base_config(module, state["overrides"])
    study = _study.open_study(sweep_dir, spec, state.get("storage"), worker)
    budget = int(state["trials"])
    interval, stale = float(state["heartbeat_s"]), float(state["stale_after_s"])
    done = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    waited_since = None
    while True:
        with _study.locked(sweep_dir):
            _study.requeue_stale(study, sweep_dir, stale)
            trials = _study.counted(study.get_trials(deepcopy=False))
            states = [t.state for t in trials]
            waiting = optuna.trial.TrialState.WAITING in states
            trial = None
            if waiting or len(trials) < budget:
                trial = study.ask()
                if _study.SLOT not in trial.user_attrs:  # fresh: the next free slot
                    # (slots are 0..budget-1; a requeued trial keeps its own.)
                    trial.set_user_attr(_study.SLOT, len(trials))
                    trial.set_user_attr(_study.ATTEMPT, 1)
                beat = _study.Heartbeat(sweep_dir, trial.number, worker, interval)
            elif optuna.trial.TrialState.RUNNING not in states:
                return done
        if trial is None:  # every slot is taken; wait for the running ones (or requeue them)
            waited_since = waited_since or time.monotonic()
            if max_wait_s is not None and time.monotonic() - waited_since > max_wait_s:
                return done
            time.sleep(min(interval, 1.0))  # a cheap poll: the journal is read incrementally
            continue
        waited_since = None
        slot = trial.user_attrs[_study.SLOT]
        print(f"[worker {worker}] trial {trial.number} (slot {slot})", flush=True)
        try:
            value = run_trial(trial, module, spec, base, sweep_dir)
        except optuna.TrialPruned:
            _tell(study, trial, worker, state=optuna.trial.TrialState.PRUNED)
            done["PRUNED"] += 1
        except SystemExit as e:  # preempted (SIGTERM): checkpoint saved; requeue, then exit
            frozen = study._storage.get_trial(trial._trial_id)
            _study.requeue(study, study._storage, frozen, f"preempted (exit {e.code})")
            raise
        except Exception as e:
            text = traceback.format_exc()
            workdir = sweep_dir / "trials" / str(slot)
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "traceback.txt").write_text(text)
            print(f"[worker {worker}] trial {trial.number} failed: {e!r}", flush=True)
            with contextlib.suppress(Exception):  # finished meanwhile (see _tell)
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            _tell(study, trial, worker, state=optuna.trial.TrialState.FAIL)
            done["FAIL"] += 1
        else:
            _tell(study, trial, worker, value)
            done["COMPLETE"] += 1
        finally:
            beat.stop()
