"""``jaxmint diagnose``, ``jaxmint plot`` and ``jaxmint lr-find``."""

from __future__ import annotations

import sys
from pathlib import Path

from jaxmint.cli._sweep import _OverridesParser
from jaxmint.config import parse, positive_float, positive_int
from jaxmint.diagnose import diagnose_run, localize_nonfinite, lr_find, plot_metrics
from jaxmint.experiment import load_module
from jaxmint.run import RunDir, RunDirError


def add_commands(sub) -> None:
    p = sub.add_parser("diagnose", help="flag training pathologies in a run dir; write plots")
    p.add_argument("run_dir")
    p.add_argument(
        "--nan",
        action="store_true",
        help="replay the step that went non-finite and say where NaN/inf appeared",
    )
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(fn=_diagnose)
    p = sub.add_parser("plot", help="compare runs: one PNG with a metric over steps")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric name, e.g. loss/ce or eval/accuracy (repeatable; default loss)",
    )
    p.add_argument("--out", default="runs.png", help="PNG to write (default %(default)s)")
    p.set_defaults(fn=_plot)
    p = sub.add_parser("lr-find", help="learning-rate range test of an experiment")
    p.add_argument("experiment", help="path to the experiment script")
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--lr-min", type=positive_float, default=1e-7)
    p.add_argument("--lr-max", type=positive_float, default=1.0)
    p.add_argument("--out", default="lr_find.png", help="PNG to write (default %(default)s)")
    p.description = "Arguments after -- are config flags of the experiment, e.g. -- --smoke."

    p.__class__ = _OverridesParser  # keeps everything after -- as `overrides`
    p.set_defaults(fn=_lr_find)


def _diagnose(args) -> int:
    run = RunDir(args.run_dir)
    try:
        run.require_metrics()
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.nan:
        try:
            print(localize_nonfinite(run))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    print(diagnose_run(run, plots=not args.no_plots).text)
    return 0


def _plot(args) -> int:
    runs = {}
    for d in args.run_dirs:
        try:
            runs[str(d)] = RunDir(d).require_metrics()
        except RunDirError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        out = plot_metrics(runs, args.metric or ["loss"], Path(args.out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _lr_find(args) -> int:
    if not args.lr_min < args.lr_max:
        print(
            f"jaxmint lr-find: error: --lr-min {args.lr_min:g} must be below --lr-max "
            f"{args.lr_max:g}",
            file=sys.stderr,
        )
        return 2
    module = load_module(args.experiment)
    config = parse(module.Config, args.overrides, smoke=getattr(module, "SMOKE", None))
    exp = module.build(config)
    try:
        result = lr_find(
            exp.model,
            exp.loss,
            exp.train,
            batch_size=config.batch_size,
            steps=args.steps,
            lr_min=args.lr_min,
            lr_max=args.lr_max,
            seed=config.seed,
            input_key=exp.input_key,
        )
    except RuntimeError as e:  # diverged at once: the message says what to change
        print(f"jaxmint lr-find: error: {e}", file=sys.stderr)
        return 2
    path = result.plot(args.out)
    print(
        f"suggested learning rate: {result.suggestion:.2e} (loss lowest at "
        f"{result.min_loss_lr:.2e}); plot: {path}"
    )
    print(f"try: python {args.experiment} --lr {result.suggestion:.2e}")
    return 0
