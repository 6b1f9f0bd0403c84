"""Sweep results: one row per trial slot, a CSV and PNG plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from jaxmint._extras import pyplot
from jaxmint.sweep import _study
from jaxmint.sweep._space import decode
from jaxmint.sweep._worker import load_sweep


def rows(study) -> list[dict]:
    """One row per trial slot (the latest attempt), sorted best first; unfinished last.

    Keys: ``trial`` (the slot: its run dir is ``trials/<trial>``), ``state``, ``value``,
    ``attempts``, ``seconds``, ``error`` and one ``params/<name>`` per parameter.
    """
    trials = study.get_trials(deepcopy=False)
    by_slot: dict[int, list] = {}
    for t in trials:
        by_slot.setdefault(_study.slot_of(t), []).append(t)
    out = []
    for slot, attempts in by_slot.items():
        attempts.sort(key=lambda t: t.number)
        last = attempts[-1]
        seconds = None
        if last.datetime_start and last.datetime_complete:
            seconds = (last.datetime_complete - last.datetime_start).total_seconds()
        row = {
            "trial": slot,
            "state": last.state.name,
            "value": last.value if last.state.name == "COMPLETE" else None,
            "attempts": len(attempts),
            "seconds": seconds,
            "error": last.user_attrs.get("error", ""),
        }
        params = {}
        for t in attempts:
            params.update(t.params)
        row.update({f"params/{k}": decode(v) for k, v in sorted(params.items())})
        out.append(row)
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    out.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0), r["trial"]))
    return out


def curves(study) -> dict[int, dict[int, float]]:
    """Intermediate objective values per slot (a resumed trial's attempts merged)."""
    out: dict[int, dict[int, float]] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        out.setdefault(_study.slot_of(t), {}).update(t.intermediate_values)
    return out


def write_csv(table: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in table for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in table:
            writer.writerow({k: _cell(r.get(k)) for k in keys})


def _cell(v):
    if isinstance(v, list | tuple):
        return " ".join(map(str, v))
    return "" if v is None else v


def plot(study, table: list[dict], out_dir: Path, objective: str) -> list[Path]:
    """Save ``objective.png``, ``params.png`` and ``curves.png``; returns their paths."""
    plt = pyplot()

    done = sorted((r for r in table if r["value"] is not None), key=lambda r: r["trial"])
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    if done:
        xs, ys = [r["trial"] for r in done], [r["value"] for r in done]
        best = max if study.direction.name == "MAXIMIZE" else min
        running = [best(ys[: i + 1]) for i in range(len(ys))]
        ax.plot(xs, ys, "o", label="trial")
        ax.step(xs, running, where="post", label="best so far")
        ax.legend()
    ax.set(xlabel="trial", ylabel=objective, title="objective per trial")
    paths.append(_save(fig, out_dir / "objective.png", plt))

    names = sorted({k for r in table for k in r if k.startswith("params/")})
    cols = max(1, min(3, len(names)))
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pts = [(r[name], r["value"]) for r in done if name in r]
        xs = [p[0] for p in pts]
        if xs and all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs):
            ax.plot(xs, [p[1] for p in pts], "o")
            if min(xs) > 0 and max(xs) / min(xs) > 100:
                ax.set_xscale("log")
        else:
            labels = [str(x) for x in xs]
            order = sorted(set(labels))
            ax.plot([order.index(x) for x in labels], [p[1] for p in pts], "o")
            ax.set_xticks(range(len(order)), order, rotation=30, fontsize=7)
        ax.set(xlabel=name[len("params/") :], ylabel=objective)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("objective vs each parameter")
    paths.append(_save(fig, out_dir / "params.png", plt))

    fig, ax = plt.subplots(figsize=(6, 4))
    states = {r["trial"]: r["state"] for r in table}
    for slot, values in sorted(curves(study).items()):
        if values:
            steps = sorted(values)
            style = "--" if states.get(slot) == "PRUNED" else "-"
            ax.plot(steps, [values[s] for s in steps], style, label=str(slot), alpha=0.8)
    ax.set(xlabel="step", ylabel=objective, title="intermediate values (dashed: pruned)")
    if len(states) <= 20:
        ax.legend(fontsize=6, ncol=2)
    paths.append(_save(fig, out_dir / "curves.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def report(sweep_dir: str | Path, *, plots: bool = True) -> dict:
    """Load a sweep dir's study; write ``trials.csv`` (and plots). Returns what it found."""

    sweep_dir = Path(sweep_dir)
    state = _study.read_state(sweep_dir)
    _, spec = load_sweep(state["experiment"])
    study = _study.open_study(sweep_dir, spec, state.get("storage"))
    table = rows(study)
    write_csv(table, sweep_dir / "trials.csv")
    files = plot(study, table, sweep_dir, spec.objective) if plots else []
    return {
        "rows": table,
        "budget": state["trials"],
        "objective": spec.objective,
        "direction": spec.direction,
        "counts": _study.summary(study.get_trials(deepcopy=False)),
        "unfinished": int(state["trials"]) - sum(r["state"] in FINISHED for r in table),
        "files": [sweep_dir / "trials.csv", *files],
    }
