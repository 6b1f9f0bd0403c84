"""Read a run's metrics, flag known pathologies in plain sentences, and draw plots."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from jaxmint._extras import MissingExtra, pyplot
from jaxmint.run import RunDir

# Thresholds of the flags; each is tested by a run that provokes it.
DOMINANT_SHARE = 0.9  # one term's share of the total gradient
UPDATE_RATIO_HIGH, UPDATE_RATIO_LOW = 1e-1, 1e-5  # healthy is around 1e-3
LAYER_GRAD_SPREAD = 1e3  # largest / smallest layer gradient norm
GRAD_GROWTH = 1e2  # last / first total gradient norm
DEAD_FRACTION = 0.5
SATURATED_FRACTION = 0.5
SPIKE_FACTOR = 3.0  # loss above this times the median of the previous records
OVERFIT_RISE = 0.1  # eval loss 10% above its minimum while train loss keeps falling
PLATEAU_CHANGE = 0.02  # < 2% change of the mean loss from the first to the second fifth
DIVERGE_RISE = 1.5  # the data loss of the last third above this times its first record
DIVERGE_FACTOR = 1e2  # ... and this many times: orders of magnitude
DATA_LOSS_FALL = 0.1  # a data loss that fell less than this (relative) barely learned
NORM_SHRINK = 0.6  # parameters whose norm fell below this fraction of the first: crushed

# The order in which flags are reported: causes before the symptoms they explain.
# A learning rate far too high (diverging, update-ratio-high) explains dead or
# saturated units, vanishing or exploding gradients, spikes and a bad eval, so
# when one of those two is found, the others are listed as its likely consequences.
RANK = [  # every code of FIXES
    "diverging",
    "update-ratio-high",
    "exploding-gradient",
    "loss-spike",
    "regularizer-dominant",
    "dominant-term",
    "update-ratio-low",
    "plateau-at-start",
    "vanishing-gradient",
    "dead-units",
    "saturated-units",
    "overfitting",
]
LR_TOO_HIGH = {"diverging", "update-ratio-high"}


# What each flag suggests: the same advice for every run, so it is kept apart from the
# finding (which carries the run's numbers) and a generated table can quote it.
FIXES = {
    "diverging": "The learning rate is likely too high: lower it, or find one with "
    "`jaxmint lr-find`.",
    "update-ratio-high": "The learning rate is likely too high.",
    "exploding-gradient": "Training is diverging: lower the learning rate or clip gradients "
    "(optax.clip_by_global_norm).",
    "loss-spike": "Lower the learning rate, add warmup, or clip gradients.",
    "regularizer-dominant": "Lower its weight.",
    "dominant-term": "Lower its weight or raise the others'.",
    "update-ratio-low": "The learning rate is likely too low for it, or its gradient vanishes "
    "(try `jaxmint lr-find`).",
    "plateau-at-start": "The learning rate is likely too low (try `jaxmint lr-find`).",
    "vanishing-gradient": "Check initialization and normalization.",
    "dead-units": "Lower the learning rate, or use a leaky activation.",
    "saturated-units": "Scale inputs or initialization down.",
    "overfitting": "Stop earlier (export --best), regularize, or get more data.",
}


@dataclass
class Flag:
    """One pathology: its ``code``, what was found in this run, and (``fix``) what to do."""

    code: str
    finding: str
    consequence: bool = False  # explained by a flag listed before it

    @property
    def fix(self) -> str:
        return FIXES[self.code]

    @property
    def sentence(self) -> str:
        return f"{self.finding} {self.fix}"


@dataclass
class Report:
    run_dir: Path
    flags: list[Flag] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        lines = [f"diagnosis of {self.run_dir}"]
        for k, v in self.summary.items():
            lines.append(f"  {k}: {v}")
        lines += describe(self.flags)
        for p in self.plots:
            lines.append(f"plot: {p}")
        return "\n".join(lines)


def describe(flags: list[Flag]) -> list[str]:
    """The flags as report lines: the likely cause, then what else, then consequences."""
    if not flags:
        return ["no known pathology found"]
    lines = [f"likely cause: [{flags[0].code}] {flags[0].sentence}"]
    for i, f in enumerate(flags[1:]):
        if f.consequence and (i == 0 or not flags[i].consequence):
            lines.append("likely consequences of it:")
        elif not f.consequence and i == 0:
            lines.append("also found:")
        lines.append(f"- [{f.code}] {f.sentence}")
    return lines


def _series(records, key):
    return [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]


def _keys(records, prefix):
    return sorted({k for r in records for k in r if k.startswith(prefix)})


def _term_flags(records, late, regularizers: set[str]) -> list[Flag]:
    """A data term that drowns the others, or a regularizer that drowns the data.

    Terms on the parameters (regularizers, such as weight decay) are judged apart:
    a regularizer with most of the gradient is normal while the model learns, and a
    problem when the data loss has stopped falling or the parameters are crushed
    (their norm fell below 60% of its first value).
    """
    shares = {
        k.split("/", 2)[2]: [v for _, v in _series(late, k)]
        for k in _keys(records, "diag/grad_share/")
    }
    shares = {name: statistics.median(v) for name, v in shares.items() if v}
    data = {n: v for n, v in shares.items() if n not in regularizers}
    flags = []
    if len(data) >= 2:
        # A small auxiliary term (weighted down on purpose, like a z-loss) under the
        # main one is by design. A term is flagged when it drowns the others and is
        # either weighted itself (its weight is too high) or competes with another
        # unweighted term (two main objectives, one of which does not train).
        weighted = {k.split("/", 1)[1] for r in records for k in r if k.startswith("weight/")}
        unweighted = [n for n in data if n not in weighted]
        total = sum(max(v, 0.0) for v in data.values()) or 1.0
        for name, share in data.items():
            if share / total <= DOMINANT_SHARE:
                continue
            if name in weighted or len(unweighted) >= 2:
                flags.append(
                    Flag(
                        "dominant-term",
                        f"loss term '{name}' makes {share / total:.0%} of the data terms' "
                        "gradient; the other terms barely train.",
                    )
                )
    fell, shrunk = _data_loss_fall(records, regularizers), _norm_ratio(records)
    stalled = fell is not None and fell < DATA_LOSS_FALL
    crushed = shrunk is not None and shrunk < NORM_SHRINK
    for name in sorted(regularizers & shares.keys()):
        if shares[name] > DOMINANT_SHARE and (stalled or crushed):
            why = (
                f"the parameters' norm fell to {shrunk:.0%} of its first value"
                if crushed
                else f"the data loss fell only {fell:.1%}"
            )
            flags.append(
                Flag(
                    "regularizer-dominant",
                    f"regularizer '{name}' makes {shares[name]:.0%} of the gradient and {why}: "
                    "it pulls the parameters harder than the data does.",
                )
            )
    return flags


def _norm_ratio(records) -> float | None:
    """The parameters' norm at the last diagnosed record over the first."""
    norms = [
        math.sqrt(sum(v * v for k, v in r.items() if k.startswith("diag/param_norm/")))
        for r in records
        if any(k.startswith("diag/param_norm/") for k in r)
    ]
    if len(norms) < 2 or norms[0] <= 0:
        return None
    return norms[-1] / norms[0]


def _data_loss_fall(records, regularizers: set[str]) -> float | None:
    """The relative fall of the data terms' loss (the total without regularizers) from
    the first fifth of the records to the last."""
    rows = []
    for r in records:
        if not (isinstance(r.get("loss"), int | float) and math.isfinite(r["loss"])):
            continue
        value = r["loss"] - sum(
            r.get(f"weight/{n}", 1.0) * r[f"loss/{n}"]
            for n in regularizers
            if isinstance(r.get(f"loss/{n}"), int | float)
        )
        rows.append(value)
    fifth = len(rows) // 5
    if fifth < 1:
        return None
    first, last = statistics.fmean(rows[:fifth]), statistics.fmean(rows[-fifth:])
    return (first - last) / max(abs(first), 1e-12)


def _data_series(records, regularizers: set[str]) -> list[tuple[int, float]]:
    """The data terms' loss before their weights (the sum of the unweighted
    ``loss/<name>`` of every term that is not a regularizer; the total when the run
    logged no terms), so that a weight ramped up by a schedule is not read as a rise."""
    out = []
    for r in records:
        names = [
            k.split("/", 1)[1]
            for k in r
            if k.startswith("loss/") and k.split("/", 1)[1] not in regularizers
        ]
        values = [r[f"loss/{n}"] for n in names] if names else [r.get("loss")]
        if all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            out.append((r["step"], float(sum(values))))
    return out


def _diverging(records, regularizers: set[str]) -> Flag | None:
    """The data loss ends well above its first record (orders of magnitude, or half as
    much again); or the total loss does while the data loss has not fallen (the
    parameters blow up while predictions stay at chance); or the loss became non-finite."""
    loss = _data_series(records, regularizers)
    total = _series(records, "loss")
    nonfinite = any(
        isinstance(r.get("loss"), float) and not math.isfinite(r["loss"]) for r in records
    )
    if len(loss) < 3 or loss[0][1] <= 0:
        return None
    first_step, first = loss[0]
    tail = statistics.median(v for _, v in loss[-max(1, len(loss) // 3) :])
    total_tail = statistics.median(v for _, v in total[-max(1, len(total) // 3) :])
    if total[0][1] > 0 and total_tail > DIVERGE_RISE * total[0][1] and tail > 0.9 * first:
        first_step, first, tail = total[0][0], total[0][1], total_tail
    if nonfinite or tail > DIVERGE_RISE * first:
        what = "became non-finite" if nonfinite else f"rose to {tail:.3g}"
        size = f" ({tail / first:.0e} times)" if tail > DIVERGE_FACTOR * first else ""
        return Flag(
            "diverging",
            f"training diverges: the loss was {first:.3g} at step {first_step} and {what}"
            f"{size} by the end.",
        )
    return None


def find_flags(records: list[dict], *, regularizers=()) -> list[Flag]:
    """The pathologies visible in ``records`` (the rows of a metrics.jsonl), the likely
    cause first; ``regularizers`` names the loss terms on the parameters."""
    flags: list[Flag] = []
    diverging = _diverging(records, set(regularizers))
    if diverging is not None:
        flags.append(diverging)
    late = records[len(records) // 2 :]  # judge gradient statistics on the second half

    flags += _term_flags(records, late, set(regularizers))

    for key in _keys(records, "diag/update_ratio/"):
        values = [v for _, v in _series(late, key)]
        if not values:
            continue
        layer, ratio = key.split("/", 2)[2], statistics.median(values)
        if ratio > UPDATE_RATIO_HIGH:
            flags.append(
                Flag(
                    "update-ratio-high",
                    f"layer '{layer}' changes by {ratio:.1e} of its norm per step (healthy: "
                    "~1e-3).",
                )
            )
        elif ratio < UPDATE_RATIO_LOW:
            flags.append(
                Flag(
                    "update-ratio-low",
                    f"layer '{layer}' changes by only {ratio:.1e} of its norm per step "
                    "(healthy: ~1e-3).",
                )
            )

    layer_norms = {}
    for key in _keys(records, "diag/layer_grad_norm/"):
        values = [v for _, v in _series(late, key)]
        if values:
            layer_norms[key.split("/", 2)[2]] = statistics.median(values)
    if len(layer_norms) >= 2:
        hi = max(layer_norms, key=layer_norms.get)
        lo = min(layer_norms, key=layer_norms.get)
        if layer_norms[hi] > LAYER_GRAD_SPREAD * max(layer_norms[lo], 1e-30):
            flags.append(
                Flag(
                    "vanishing-gradient",
                    f"gradients differ by {layer_norms[hi] / max(layer_norms[lo], 1e-30):.0e}x "
                    f"between layers ('{hi}' vs '{lo}'): gradients vanish or explode through "
                    "the depth.",
                )
            )
    grad = [v for _, v in _series(records, "grad_norm")]
    if len(grad) >= 4 and grad[0] > 0 and statistics.median(grad[-3:]) > GRAD_GROWTH * grad[0]:
        flags.append(
            Flag(
                "exploding-gradient",
                f"the gradient norm grew from {grad[0]:.2g} to {grad[-1]:.2g}.",
            )
        )

    for prefix, limit, code, what in (
        (
            "diag/dead/",
            DEAD_FRACTION,
            "dead-units",
            "of the units of '{}' never activate (dead ReLUs).",
        ),
        (
            "diag/saturated/",
            SATURATED_FRACTION,
            "saturated-units",
            "of the values of '{}' are saturated (|x| > 0.97): tanh/sigmoid units stop passing "
            "gradient.",
        ),
    ):
        for key in _keys(records, prefix):
            values = [v for _, v in _series(late, key)]
            if values and statistics.median(values) > limit:
                share = statistics.median(values)
                flags.append(Flag(code, f"{share:.0%} " + what.format(key.split("/", 2)[2])))

    loss = _series(records, "loss")
    for i in range(5, len(loss)):
        previous = statistics.median(v for _, v in loss[max(0, i - 10) : i])
        if previous > 0 and loss[i][1] > SPIKE_FACTOR * previous:
            flags.append(
                Flag(
                    "loss-spike",
                    f"the loss jumped to {loss[i][1]:.3g} at step {loss[i][0]} from about "
                    f"{previous:.3g}.",
                )
            )
            break

    evals = _series(records, "eval/loss")
    if len(evals) >= 3 and len(loss) >= 3:
        best_step, best = min(evals, key=lambda sv: sv[1])
        last_step, last = evals[-1]
        train_then = [v for s, v in loss if s <= best_step]
        if last > (1 + OVERFIT_RISE) * best and train_then and loss[-1][1] < train_then[-1]:
            flags.append(
                Flag(
                    "overfitting",
                    f"eval loss rose from {best:.3g} (step {best_step}) to {last:.3g} (step "
                    f"{last_step}) while the training loss kept falling: the model overfits.",
                )
            )

    fifth = len(loss) // 5
    if fifth >= 2:
        # Means over the first and second fifth, so that batch-to-batch noise averages out.
        first = statistics.fmean(v for _, v in loss[:fifth])
        second = statistics.fmean(v for _, v in loss[fifth : 2 * fifth])
        change = abs(second - first) / max(abs(first), 1e-12)
        head = loss[: 2 * fifth]
        if change < PLATEAU_CHANGE:
            flags.append(
                Flag(
                    "plateau-at-start",
                    f"the loss moved only {change:.1%} over the first {head[-1][0]} steps.",
                )
            )
    return _ranked(flags)


def _ranked(flags: list[Flag]) -> list[Flag]:
    """Causes first; with a learning rate far too high, the rest are its consequences."""
    flags = sorted(flags, key=lambda f: RANK.index(f.code))
    if flags and flags[0].code in LR_TOO_HIGH:
        for f in flags[1:]:
            f.consequence = f.code not in LR_TOO_HIGH  # the other is more evidence of it
    return flags


def _terms_summary(record: dict, regularizers) -> dict:
    """Each term at the last record as logged (unweighted), its weight and its weighted
    part of the loss: ``loss/<name>`` is the term before its weight."""
    names = [k.split("/", 1)[1] for k in record if k.startswith("loss/")]
    if not names:
        return {}
    parts = []
    for name in names:
        value, weight = record[f"loss/{name}"], record.get(f"weight/{name}", 1.0)
        if not isinstance(value, int | float):
            continue
        kind = " (regularizer)" if name in regularizers else ""
        parts.append(f"{name}{kind} {value:.4g} x {weight:.3g} = {value * weight:.4g}")
    return {f"terms at step {record['step']} (loss/<name> x weight/<name>)": "; ".join(parts)}


def plot_metrics(runs: dict[str, list[dict]], metrics: list[str], out: Path, title: str = ""):
    """One PNG with ``metrics`` over steps for each run (several runs: one line each)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    drawn = 0
    for label, records in runs.items():
        for metric in metrics:
            series = _series(records, metric)
            if series:
                steps, values = zip(*series, strict=True)
                name = metric if len(runs) == 1 else f"{label}: {metric}"
                ax.plot(steps, values, label=name)
                drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"none of the runs logged {metrics}")
    ax.set_xlabel("step")
    ax.set_title(title)
    if all(v > 0 for r in runs.values() for m in metrics for _, v in _series(r, m)):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def diagnose_run(run_dir: str | os.PathLike, *, plots: bool = True) -> Report:
    """Flag pathologies in a run dir's metrics and write ``diagnosis/*.png`` plots."""
    run = RunDir.of(run_dir)
    records = run.metrics()
    run_dir = run.path
    regularizers = run.read_config().get("loss", {}).get("regularizers", [])
    report = Report(run_dir, find_flags(records, regularizers=regularizers))
    report.summary = {
        "logged steps": len(records),
        "last step": records[-1]["step"] if records else None,
    }
    if records:
        report.summary.update(_terms_summary(records[-1], regularizers))
    if plots and records:
        try:
            pyplot()
        except MissingExtra as e:  # the report stands without its plots
            report.summary["plots"] = f"not drawn: {e}"
            plots = False
    if plots and records:
        out = run.diagnosis_dir
        out.mkdir(exist_ok=True)
        runs = {run_dir.name: records}
        terms = ["loss", *_keys(records, "loss/"), *_keys(records, "eval/loss")]
        report.plots.append(plot_metrics(runs, terms, out / "losses.png", "loss and its terms"))
        for prefix, title in (
            ("diag/grad_share/", "share of the gradient by loss term"),
            ("diag/update_ratio/", "update / parameter norm by layer"),
            ("diag/layer_grad_norm/", "gradient norm by layer"),
        ):
            keys = _keys(records, prefix)
            if keys:
                name = prefix.strip("/").split("/")[-1]
                report.plots.append(plot_metrics(runs, keys, out / f"{name}.png", title))
        text = out / "report.txt"
        text.write_text(report.text + "\n")
    return report
