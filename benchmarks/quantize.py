"""Quantized artifacts against float: bytes, batch-1 latency and eval accuracy per target.

Run (about two minutes on 2 CPU cores)::

    python benchmarks/quantize.py            # full
    python benchmarks/quantize.py --quick    # fewer calls, smaller models, ONNX only

Setup: two MLPs trained on digits and exported float and quantized:

- ``digits`` (64 -> 64 -> 10, 300 steps), the ``xla``, ``onnx`` and ``iree``
  targets: float, ``bf16`` and ``int8-weights`` (weight-only: weights stored
  quantized, dequantized in the graph) on every target, ``int8`` (ONNX Runtime's
  static quantization of weights and activations, calibrated on 256 training
  inputs) on ``onnx``;
- ``wide`` (64 -> 1024 -> 1024 -> 10, 100 steps; not in ``--quick``), the
  ``onnx`` target: float, ``int8-weights`` and ``int8``; here the matmuls, not
  the per-call overhead, set the latency;
- ``char``: the char_transformer experiment's model, smaller (2 layers, d_model
  64, 64 bytes, 300 steps on 300 kB of the standard library), ``xla`` and
  ``onnx``: float and ``int8-weights``, judged by bits per byte on 128 held-out
  sequences.

Each (model, scheme, target) is loaded through the runtime; batch-1 latency is the
median of ``--calls`` calls per round, the variants taking turns round by round;
accuracy is on the digits test split (359 examples).

Reported: artifact bytes and weight bytes / float (goal for int8: <= 0.3),
batch-1 latency / float per target (goal for static int8 on ONNX: <= 0.8;
weight-only schemes do not aim at it: they trade a dequantize per call for
bytes), the accuracy drop in points (goal <= 0.5), and the char model's bits per
byte with int8 weights / float (goal: within 1%). Written to
``benchmarks/results/quantize.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import optax
from _common import environment, med, table, write_result

import jaxmint
import jaxmint_runtime
from jaxmint.export import export_model
from jaxmint.export._quantize import task_metric

RESULTS = Path(__file__).resolve().parent / "results"
ALL = ("xla", "onnx", "iree")
SCHEMES = ("none", "bf16", "int8-weights")
# model -> (hidden widths, steps, {scheme: targets})
# model -> (hidden widths or d_model, steps, {scheme: targets})
MODELS = {
    "digits": (
        (64,),
        300,
        {"none": ALL, "bf16": ALL, "int8-weights": ALL, "int8": ("onnx",)},
    ),
    "wide": (
        (1024, 1024),
        100,
        {"none": ("onnx",), "int8-weights": ("onnx",), "int8": ("onnx",)},
    ),
    "char": (
        (64,),
        300,
        {"none": ("xla", "onnx"), "int8-weights": ("xla", "onnx")},
    ),
}
CHAR_SEQ = 64


def trained(name: str, widths, steps: int):
    """``(model, params, train, test)`` of one benchmark model."""
    if name == "char":  # the char_transformer experiment's model, smaller
        train, test = jaxmint.data.stdlib_chars(CHAR_SEQ, max_bytes=300_000)
        test = {k: v[:128] for k, v in test.items()}
        model = jaxmint.models.transformer(
            256,
            max_len=CHAR_SEQ,
            d_model=widths[0],
            num_layers=2,
            num_heads=4,
            attention=jaxmint.models.portable_attention,
        )
        lr, batch = 3e-3, 32
    else:
        train, test = jaxmint.data.digits()
        model = jaxmint.models.mlp(widths, 10)
        lr, batch = (1e-2 if widths[0] <= 64 else 1e-3), 64
    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(lr),
        train,
        steps=steps,
        batch_size=batch,
        progress=False,
    )
    return model, result.params, train, test


def artifact_bytes(path: Path, prefix: str = "") -> int:
    files = json.loads((path / "manifest.json").read_text())["files"]
    return sum(v["bytes"] for k, v in files.items() if k.startswith(prefix))


def export_all(name, widths, steps, schemes, tmp: Path):
    """``({scheme: artifact path}, test data)`` of one trained model."""
    model, params, train, test = trained(name, widths, steps)
    paths = {}
    for scheme, targets in schemes.items():
        extra = {} if scheme == "none" else {"quantize": scheme, "eval_data": test}
        if scheme == "int8":
            extra.update(calibration_data=train, calibration_source="train")
        paths[scheme] = export_model(
            model,
            {"params": params},
            test["x"][:16],
            tmp / f"{name}-{scheme}",
            name=name,
            targets=targets,
            **extra,
        )
    return paths, test


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    parser.add_argument("--calls", type=int, default=None, help="per variant and round")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize.json")
    args = parser.parse_args(argv)
    rounds, calls = (2, 30) if args.quick else (5, args.calls or 400)
    models = dict(MODELS)
    if args.quick:
        # Every scheme still runs, on ONNX only (tests/export/test_quantize.py covers the
        # other targets); the wide MLP (the digits model's code path, larger) is left out.
        models["digits"] = ((64,), 100, dict.fromkeys((*SCHEMES, "int8"), ("onnx",)))
        del models["wide"]
        models["char"] = ((32,), 30, dict.fromkeys(models["char"][2], ("onnx",)))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        paths, predictors, rows, first = {}, {}, {}, {}
        for name, (widths, steps, schemes) in models.items():
            paths[name], test = export_all(name, widths, steps, schemes, Path(tmp))
            first[name] = test["x"][:1]
            measure = task_metric(test, "x", ["output"])  # the export's own judge
            for scheme, targets in schemes.items():
                for target in targets:
                    p = jaxmint_runtime.load(paths[name][scheme], backend=target)
                    metric = measure(lambda x, p=p: p.run({"x": x}))
                    predictors[name, scheme, target] = p
                    rows[name, scheme, target] = {**metric, "latency_us": []}
        for r in range(rounds):
            order = list(predictors) if r % 2 == 0 else list(predictors)[::-1]
            for key in order:
                p, x1 = predictors[key], first[key[0]]
                p.run({"x": x1})
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    p.run({"x": x1})
                    times.append(time.perf_counter() - start)
                rows[key]["latency_us"].append(1e6 * med(times))
        sizes = {
            name: {
                s: {
                    "artifact": artifact_bytes(path),
                    "weights": artifact_bytes(path, "weights.safetensors"),
                    "onnx": artifact_bytes(path, "onnx/"),
                }
                for s, path in by_scheme.items()
            }
            for name, by_scheme in paths.items()
        }

    summary, out_rows = {}, []
    for (name, scheme, target), row in rows.items():
        base = rows[name, "none", target]
        entry = {
            "accuracy": row["accuracy"],
            "accuracy_drop": base["accuracy"] - row["accuracy"],
            "bits": row["bits"],
            "bits_over_float": row["bits"] / base["bits"],
            "latency_us": med(row["latency_us"]),
            "latency_over_float": med(row["latency_us"]) / med(base["latency_us"]),
        }
        summary.setdefault(name, {}).setdefault(scheme, {})[target] = entry
        out_rows.append(
            [
                name,
                scheme,
                target,
                f"{entry['accuracy']:.2f}",
                f"{entry['accuracy_drop']:+.2f}",
                f"{entry['bits']:.3f}",
                f"{entry['latency_us']:.0f}",
                f"{entry['latency_over_float']:.2f}",
            ]
        )
    print(
        table(
            "per model, scheme and target (medians over rounds)",
            [
                "model",
                "scheme",
                "target",
                "accuracy %",
                "drop",
                "bits",
                "batch-1 us",
                "latency / float",
            ],
            out_rows,
        )
    )

    def comparable(name, scheme, kind):
        """Both artifacts have these files (a static int8 one has only the onnx target)."""
        targets = models[name][2]
        same = kind != "artifact" or targets[scheme] == targets["none"]
        return same and sizes[name][scheme][kind] and sizes[name]["none"][kind]

    ratios = {
        name: {
            s: {k: v / by_scheme["none"][k] for k, v in sized.items() if comparable(name, s, k)}
            for s, sized in by_scheme.items()
        }
        for name, by_scheme in sizes.items()
    }
    for name, by_scheme in ratios.items():
        for s, r in by_scheme.items():
            if s == "none":
                continue
            shown = ", ".join(f"{k} {v:.2f}x" for k, v in r.items())
            goal = " (goal for int8 <= 0.3)" if s.startswith("int8") else ""
            print(f"{name} {s}: bytes / float: {shown}{goal}")
        if name == "char":
            shown = ", ".join(
                f"{t} {v['bits_over_float']:.4f}x" for t, v in summary[name]["int8-weights"].items()
            )
            bits = summary[name]["none"]["onnx"]["bits"]
            print(
                f"char int8-weights: bits per byte / float: {shown} (float {bits:.3f}; "
                "goal within 1%)"
            )
        if "int8" in summary[name]:
            ratio = summary[name]["int8"]["onnx"]["latency_over_float"]
            print(f"{name} int8 onnx: batch-1 latency / float onnx {ratio:.2f} (goal <= 0.8)")
    result = {
        "environment": environment(),
        "rounds": rounds,
        "calls": calls,
        "models": {name: {"widths": list(m[0]), "steps": m[1]} for name, m in models.items()},
        "bytes": sizes,
        "bytes_over_float": ratios,
        "summary": summary,
    }
    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main()
