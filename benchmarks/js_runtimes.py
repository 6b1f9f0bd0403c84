"""One ONNX artifact in Python, Node.js and the browser: batch-1 latency and cold start.

Run (about a minute on 2 CPU cores; needs `bash scripts/setup.sh "[dev]"`, which
installs export/js's npm packages and chromium)::

    python benchmarks/js_runtimes.py            # full
    python benchmarks/js_runtimes.py --quick    # one round, fewer calls

The artifact is the golden digits MLP (tests/golden/digits_onnx_v2, 64 -> 32 -> 10,
ONNX target). Each round starts a fresh process per runtime, the runtimes taking
turns:

- ``python``: ``jaxmint_runtime.load(..., backend="onnx")`` and ``Predictor.run``
  (ONNX Runtime's CPU provider, one intra-op thread as in the others);
- ``node``: ``jaxmint-runtime-js`` with ``onnxruntime-node`` (export/js/scripts/bench-node.mjs);
- ``browser``: the demo page (examples/browser) in headless Chromium with
  ``onnxruntime-web`` (WebAssembly, one thread), driven by playwright-core.

Cold start: from the process's first line (the page's navigation for the browser)
to the first answer, checks of every file's sha256 and the check sample included;
imports count (Python's numpy and jsonschema, Node's onnxruntime-node and ajv; the
page's fetch and compile of the WebAssembly). Batch-1 latency: the median call
(Python, Node) or the mean of a timed loop (the page's clock is coarse), input
validation included. Reported as ratios to Python, written to
``benchmarks/results/js_runtimes.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, med, table, write_result

REPO = Path(__file__).resolve().parents[1]
JS = REPO / "export/js"
ARTIFACT = REPO / "tests/golden/digits_onnx_v2"
RESULTS = Path(__file__).resolve().parent / "results"

PYTHON_CHILD = """
import time, sys, json
started = time.perf_counter()
import numpy as np
import jaxmint_runtime
p = jaxmint_runtime.load(sys.argv[1], backend="onnx")
x = np.full((1, 64), 0.5, np.float32)
p.run({"x": x})
cold = time.perf_counter() - started
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    p.run({"x": x})
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"coldMs": 1e3 * cold, "batch1Us": 1e6 * times[len(times) // 2]}))
"""


def python_once(calls: int) -> dict:
    env = {**os.environ, "JAXMINT_ONNX_THREADS": "1"}
    argv = [sys.executable, "-c", PYTHON_CHILD, str(ARTIFACT), str(calls)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def node_once(calls: int) -> dict:
    argv = ["node", "scripts/bench-node.mjs", str(ARTIFACT), str(calls)]
    out = subprocess.run(argv, cwd=JS, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def browser_once(calls: int, url: str, chromium: str, tmp: Path) -> dict:
    digits = tmp / "digits.json"
    digits.write_text(json.dumps([[0.5] * 64]))
    argv = ["node", "scripts/browser-check.mjs", "--url", url, "--chromium", chromium]
    argv += ["--digits", str(digits), "--calls", str(calls)]
    out = subprocess.run(argv, cwd=JS, capture_output=True, text=True, check=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    first = report["results"][0]["ms"]
    return {
        "coldMs": report["pageReadyMs"] + first,
        "inPageLoadMs": report["loadMs"],
        "batch1Us": 1e3 * report["batch1MeanMs"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, fewer calls")
    parser.add_argument("--out", type=Path, default=RESULTS / "js_runtimes.json")
    args = parser.parse_args(argv)
    rounds, calls = (1, 200) if args.quick else (5, 2000)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not (JS / "node_modules").is_dir():
        raise SystemExit(
            'needs node_modules in export/js and chromium: bash scripts/setup.sh "[dev]"'
        )
    if not (JS / "dist/browser.js").exists():
        subprocess.run(["npm", "run", "--silent", "build"], cwd=JS, check=True)
    spec = importlib.util.spec_from_file_location("serve", REPO / "examples/browser/serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    load_before = os.getloadavg()
    server, url = serve.serve_in_thread(ARTIFACT)
    runs: dict[str, list[dict]] = {"python": [], "node": [], "browser": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                order = list(runs) if r % 2 == 0 else list(runs)[::-1]
                for name in order:
                    if name == "python":
                        runs[name].append(python_once(calls))
                    elif name == "node":
                        runs[name].append(node_once(calls))
                    else:
                        runs[name].append(browser_once(calls, url, chromium, Path(tmp)))
                time.sleep(0.2)
    finally:
        server.shutdown()
        server.server_close()
    summary = {
        name: {key: med([m[key] for m in measured]) for key in ("coldMs", "batch1Us")}
        for name, measured in runs.items()
    }
    base = summary["python"]
    rows = []
    for name, s in summary.items():
        s["cold_over_python"] = s["coldMs"] / base["coldMs"]
        s["latency_over_python"] = s["batch1Us"] / base["batch1Us"]
        rows.append(
            [
                name,
                f"{s['coldMs']:.0f}",
                f"{s['cold_over_python']:.2f}",
                f"{s['batch1Us']:.1f}",
                f"{s['latency_over_python']:.2f}",
            ]
        )
    print(
        table(
            f"golden digits MLP, ONNX target (medians of {rounds} fresh processes)",
            ["runtime", "cold start ms", "/ python", "batch-1 us", "/ python"],
            rows,
        )
    )
    result = {
        "environment": environment(),
        "rounds": rounds,
        "calls": calls,
        "summary": summary,
        "runs": runs,
    }
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
