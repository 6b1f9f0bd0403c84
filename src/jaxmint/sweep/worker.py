"""A sweep worker: pulls trials from the study and trains each one until the budget is spent.

Run as a process of its own, pinned to one accelerator by its environment (the
launchers set ``CUDA_VISIBLE_DEVICES`` and ``XLA_PYTHON_CLIENT_MEM_FRACTION``
before this process, and so jax, starts)::

    python -m jaxmint.sweep.worker --sweep-dir DIR [--worker 0]
"""

from __future__ import annotations

import argparse
import sys

from jaxmint.sweep._space import SweepError
from jaxmint.sweep._worker import run_worker


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxmint.sweep.worker", description=__doc__)
    parser.add_argument("--sweep-dir", required=True, help="the sweep dir (holds sweep.json)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index (seeds)")
    args = parser.parse_args(argv)
    try:
        done = run_worker(args.sweep_dir, args.worker)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[worker {args.worker}] finished: {done}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
