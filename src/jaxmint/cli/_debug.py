"""``jaxmint inspect-step RUN_DIR``: one train step of a run, taken apart."""

from __future__ import annotations

import sys

from jaxmint.checkpoint import CheckpointError
from jaxmint.debug import inspect_run
from jaxmint.export import ExportError


def add_parsers(sub) -> None:
    """Register the debugging subcommands on the ``jaxmint`` parser."""
    p = sub.add_parser(
        "inspect-step",
        help="loss terms, per-term gradient norms and the update of a run's next step",
    )
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.set_defaults(fn=_inspect_step)


def _inspect_step(args) -> int:
    try:
        report, step = inspect_run(args.run_dir, args.step)
    except (CheckpointError, ExportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.run_dir}: checkpoint at step {step}, the batch of step {step + 1}")
    print("(the update the run applies next: from the checkpoint's optimizer and loss state)\n")
    print(report)
    return 0
