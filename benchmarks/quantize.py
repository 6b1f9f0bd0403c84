"""Quantized artifacts against float: bytes, batch-1 latency and eval accuracy per target.

Run (about a minute on 2 CPU cores)::

    python benchmarks/quantize.py            # full
    python benchmarks/quantize.py --quick    # fewer timed calls

Setup: the digits MLP (64 -> 64 -> 10, 300 steps), exported three times with the
``xla``, ``onnx`` and ``iree`` targets: float, ``--quantize bf16`` and
``--quantize int8-weights`` (weight-only: weights stored quantized, dequantized
in the graph). Each (scheme, target) is loaded through the runtime; batch-1
latency is the median of ``--calls`` calls per round, the variants taking turns
round by round; accuracy is on the digits test split (359 examples).

Reported: artifact bytes and weight bytes / float (goal for int8: <= 0.3),
batch-1 latency / float per target (the goal <= 0.8 is for ONNX Runtime's static
int8, which weight-only schemes do not aim at: they trade a dequantize per call
for bytes), and the accuracy drop in points (goal <= 0.5). Written to
``benchmarks/results/quantize.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import optax
from _common import environment, med, table, write_result

import jaxmint
import jaxmint_runtime
from jaxmint.export import export_model

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = ("none", "bf16", "int8-weights")
TARGETS = ("xla", "onnx", "iree")


def artifact_bytes(path: Path, prefix: str = "") -> int:
    files = json.loads((path / "manifest.json").read_text())["files"]
    return sum(v["bytes"] for k, v in files.items() if k.startswith(prefix))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    parser.add_argument("--calls", type=int, default=None, help="per variant and round")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize.json")
    args = parser.parse_args(argv)
    rounds, calls = (2, 50) if args.quick else (5, args.calls or 400)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_before = os.getloadavg()

    train, test = jaxmint.data.digits()
    model = jaxmint.models.mlp((64,), 10)
    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        train,
        steps=300,
        batch_size=64,
        progress=False,
    )
    variables = {"params": result.params}
    x1 = test["x"][:1]
    with tempfile.TemporaryDirectory() as tmp:
        paths, predictors, rows = {}, {}, {}
        for scheme in SCHEMES:
            extra = {} if scheme == "none" else {"quantize": scheme, "eval_data": test}
            paths[scheme] = export_model(
                model,
                variables,
                test["x"][:16],
                Path(tmp) / scheme,
                name="digits",
                targets=TARGETS,
                **extra,
            )
            for target in TARGETS:
                p = jaxmint_runtime.load(paths[scheme], backend=target)
                logits = p.run({"x": test["x"]})["output"]
                acc = 100.0 * float(np.mean(np.argmax(logits, -1) == test["y"]))
                predictors[scheme, target] = p
                rows[scheme, target] = {"accuracy": acc, "latency_us": []}
        for r in range(rounds):
            order = list(predictors) if r % 2 == 0 else list(predictors)[::-1]
            for key in order:
                p = predictors[key]
                p.run({"x": x1})
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    p.run({"x": x1})
                    times.append(time.perf_counter() - start)
                rows[key]["latency_us"].append(1e6 * med(times))
        sizes = {
            s: {
                "artifact": artifact_bytes(paths[s]),
                "weights": artifact_bytes(paths[s], "weights.safetensors"),
                "onnx": artifact_bytes(paths[s], "onnx/"),
            }
            for s in SCHEMES
        }

    summary, out_rows = {}, []
    for (scheme, target), row in rows.items():
        base = rows["none", target]
        entry = {
            "accuracy": row["accuracy"],
            "accuracy_drop": base["accuracy"] - row["accuracy"],
            "latency_us": med(row["latency_us"]),
            "latency_over_float": med(row["latency_us"]) / med(base["latency_us"]),
        }
        summary.setdefault(scheme, {})[target] = entry
        out_rows.append(
            [
                scheme,
                target,
                f"{entry['accuracy']:.2f}",
                f"{entry['accuracy_drop']:+.2f}",
                f"{entry['latency_us']:.0f}",
                f"{entry['latency_over_float']:.2f}",
            ]
        )
    print(
        table(
            "per scheme and target (medians over rounds)",
            ["scheme", "target", "accuracy %", "drop", "batch-1 us", "latency / float"],
            out_rows,
        )
    )
    ratios = {
        s: {k: sizes[s][k] / sizes["none"][k] for k in sizes[s] if sizes["none"][k]}
        for s in SCHEMES
    }
    for s in SCHEMES[1:]:
        r = ratios[s]
        print(
            f"{s}: artifact {r['artifact']:.2f}x, weights file {r['weights']:.2f}x, "
            f"ONNX files {r['onnx']:.2f}x the float bytes"
            + (" (goal for int8 <= 0.3)" if s.startswith("int8") else "")
        )
    result = {
        "environment": environment(),
        "rounds": rounds,
        "calls": calls,
        "bytes": sizes,
        "bytes_over_float": ratios,
        "summary": summary,
    }
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
