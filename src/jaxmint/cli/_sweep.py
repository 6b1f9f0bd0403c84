"""``jaxmint sweep`` and ``jaxmint sweep-report``: parse arguments, call `jaxmint.sweep`."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jaxmint import sweep
from jaxmint.config import OneLineParser, positive_float, positive_int
from jaxmint.sweep import SweepError, report


def _devices(text: str) -> list[str]:
    return [d.strip() for d in text.split(",") if d.strip()]


class _OverridesParser(OneLineParser):
    """Everything after the first ``--`` is kept verbatim as ``overrides`` (flags included)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        tail = []
        if "--" in args:
            i = args.index("--")
            args, tail = args[:i], args[i + 1 :]
        namespace, extra = super().parse_known_args(args, namespace)
        namespace.overrides = tail
        return namespace, extra


def add_parsers(sub) -> None:
    """Register the sweep subcommands on the ``jaxmint`` command's subparsers."""
    p = sub.add_parser(
        "sweep",
        help="hyper-parameter search: workers pull trials of EXPERIMENT.py's sweep()",
        description="Run (or continue) the sweep defined by EXPERIMENT.py's sweep(). Arguments "
        "after -- are config overrides given to every trial, e.g. -- --smoke --steps 200.",
    )
    p.add_argument("experiment", help="experiment script that defines sweep()")
    p.add_argument("--sweep-dir", required=True, help="study journal, trial run dirs, report")
    p.add_argument("--trials", type=positive_int, help="the budget (default: the spec's trials)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: one per visible accelerator, else 1; 0: only prepare DIR)",
    )
    p.add_argument("--executor", choices=("local", "slurm", "ray"), default="local")
    p.add_argument(
        "--storage",
        help="database URL (postgresql://... or sqlite:///...) instead "
        "of the journal file in --sweep-dir",
    )
    p.add_argument(
        "--devices",
        type=_devices,
        help="accelerator ids to pin workers to, "
        "comma-separated (default: CUDA_VISIBLE_DEVICES or nvidia-smi)",
    )
    p.add_argument(
        "--timeout-min",
        type=float,
        default=24 * 60,
        help="a worker job is stopped after this many minutes (local and slurm)",
    )
    p.add_argument("--heartbeat-s", type=positive_float, default=10.0, help="heartbeat period")
    p.add_argument(
        "--stale-after-s",
        type=float,
        default=120.0,
        help="a running trial without a heartbeat for this long is requeued",
    )
    p.add_argument("--partition", help="slurm: partition")
    p.add_argument(
        "--gpus-per-task", type=positive_int, default=1, help="slurm: GPUs per array task"
    )
    p.add_argument(
        "--cpus-per-task", type=positive_int, default=8, help="slurm: CPUs per array task"
    )
    p.__class__ = _OverridesParser  # `-- --smoke --steps 9` reaches the trials untouched
    p.set_defaults(fn=_sweep)
    p = sub.add_parser("sweep-report", help="table, trials.csv and plots of a sweep dir")
    p.add_argument("sweep_dir")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(fn=_report)


def _sweep(args) -> int:
    overrides = list(args.overrides)
    sweep_dir = Path(args.sweep_dir).resolve()
    try:
        state = sweep.prepare(
            args.experiment,
            sweep_dir,
            overrides,
            trials=args.trials,
            storage=args.storage,
            heartbeat_s=args.heartbeat_s,
            stale_after_s=args.stale_after_s,
        )
    except (sweep.SweepError, FileNotFoundError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.workers == 0:  # prepare only: workers are started by hand (e.g. an sbatch file)
        print(
            f"prepared {sweep_dir}; start workers with: "
            f"python -m jaxmint.sweep.worker --sweep-dir {sweep_dir} --worker I"
        )
        return 0
    devices = args.devices if args.devices is not None else sweep.visible_devices()
    workers = args.workers if args.workers is not None else max(1, len(devices))
    print(
        f"sweep of {state['experiment']}: {state['trials']} trials, {workers} workers "
        f"({args.executor}), dir {sweep_dir}",
        flush=True,
    )
    try:
        if args.executor == "slurm":
            jobs = sweep.launch_slurm(
                sweep_dir,
                workers,
                timeout_min=args.timeout_min,
                partition=args.partition,
                gpus_per_task=args.gpus_per_task,
                cpus_per_task=args.cpus_per_task,
            )
            print(
                f"submitted SLURM job array {jobs[0].job_id.split('_')[0]} ({workers} tasks); "
                f"follow it with: jaxmint sweep-report {sweep_dir}"
            )
            return 0
        if args.executor == "ray":
            errors = sweep.launch_ray(sweep_dir, workers, timeout_min=args.timeout_min)
        else:
            jobs = sweep.launch_local(
                sweep_dir, workers, timeout_min=args.timeout_min, devices=devices
            )
            errors = sweep.wait(jobs, timeout_s=args.timeout_min * 60 + 120)
            del jobs  # before interpreter exit: submitit's job finalizers need its modules
            gc.collect()
    except sweep.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, err in enumerate(errors):
        if err:
            print(f"warning: worker {i}: {err}", file=sys.stderr)
    try:
        unfinished = _print_report(sweep_dir, plots=True)["unfinished"]
    except SweepError as e:  # the workers are done, but the study cannot be read now
        print(f"error: {e}; then run the same command again to continue", file=sys.stderr)
        return 1
    if any(errors) and unfinished > 0:
        print(
            f"error: every worker has stopped, and {unfinished} of the budget's trials are not "
            f"finished; the workers' logs are in {sweep_dir / 'submitit'}. Run the same "
            "command again to continue the sweep",
            file=sys.stderr,
        )
        return 1
    return 0


def _report(args) -> int:
    try:
        _print_report(Path(args.sweep_dir), plots=not args.no_plots)
        return 0
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _print_report(sweep_dir: Path, plots: bool) -> dict:
    found = report(sweep_dir, plots=plots)
    table = found["rows"]
    names = sorted({k for r in table for k in r if k.startswith("params/")})
    out = Table(
        "trial",
        "state",
        found["objective"],
        *[n[len("params/") :] for n in names],
        "attempts",
        "seconds",
        title=f"{found['direction']} {found['objective']}: {found['counts']} "
        f"of {found['budget']} trials",
    )
    for r in table:
        out.add_row(
            str(r["trial"]),
            r["state"],
            _fmt(r["value"]),
            *[_fmt(r.get(n)) for n in names],
            str(r["attempts"]),
            _fmt(r["seconds"]),
        )
    console = Console(width=160)
    console.print(out)
    for path in found["files"]:
        console.print(f"wrote {path}")
    return found


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return "x".join(map(str, v))
    return str(v)
