"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics

import jax

import jaxmint


def flops_of(compiled) -> float:
    """FLOPs from XLA's cost analysis: a dict in newer jax, a list of dicts in older jax."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    if not cost or "flops" not in cost:
        raise RuntimeError(f"XLA cost analysis has no 'flops' entry: {cost!r}")
    return float(cost["flops"])


def interval_rates(history) -> list[float]:
    """Steps/s of each logged interval of a run but the first (which holds the compile)."""
    if len(history) < 2:
        raise ValueError("need at least two logged intervals to exclude the first")
    return [r["steps_per_sec"] for r in history[1:]]


def steady_rate(history) -> float:
    """Steps/s over all the logged intervals of a run but the first."""
    pairs = list(itertools.pairwise(history))
    steps = sum(r["step"] - p["step"] for p, r in pairs)
    seconds = sum((r["step"] - p["step"]) / r["steps_per_sec"] for p, r in pairs)
    return steps / seconds


def med(values) -> float:
    return float(statistics.median(values))


def table(title, header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))
    out = [title, line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxmint": jaxmint.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_1_5_15min": os.getloadavg(),
    }


def write_result(result: dict, out, load_before) -> None:
    """Write ``result`` as JSON to ``out``, noting first if the machine was busy."""
    load_after = os.getloadavg()
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1) * 0.75:
        print(
            f"\nnote: other processes kept this machine busy (1-min load average "
            f"{load_before[0]:.1f} at start, {load_after[0]:.1f} at the end, on "
            f"{os.cpu_count()} CPUs); the interleaved ratios absorb part of that, not all"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
