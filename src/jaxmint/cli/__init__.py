"""The ``jaxmint`` command: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
from rich.console import Console
from rich.table import Table

import jaxmint
from jaxmint._extras import MissingExtra
from jaxmint.checkpoint import CheckpointError
from jaxmint.cli._data import add_parsers as add_data_parsers
from jaxmint.cli._debug import add_parsers as add_debug_parsers
from jaxmint.cli._diagnose import add_commands as add_diagnose_parsers
from jaxmint.cli._sweep import add_parsers as add_sweep_parsers
from jaxmint.config import OneLineParser, positive_int
from jaxmint.data import DataError, first_examples
from jaxmint.export import DEFAULT_ONNX_OPSET, ExportError, export_run
from jaxmint.losses import LossError
from jaxmint.run import DebugRunError, RunDir, RunDirError
from jaxmint.sweep import SweepError
from jaxmint.train import MeshError, plan_sharding
from jaxmint_runtime import ArtifactError, inspect_artifact


def _info(args) -> int:
    print(f"jaxmint {jaxmint.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")
    for d in jax.devices():
        print(f"  {d.id}: {d.device_kind} ({d.platform})")
    return 0


def _show(args) -> int:
    run = RunDir(args.run_dir)
    if args.sharding or args.mesh:
        return _show_sharding(run, args.mesh)
    try:
        records = run.require_metrics()
        config = run.read_config()
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ckpts = run.checkpoint_steps()
    console = Console()
    experiment = config.get("config", {}).get("experiment", "?")
    console.print(f"[bold]{run}[/]  experiment: {experiment}")
    console.print(f"checkpoints at steps: {ckpts or 'none'}")
    keys = ["step", "loss", *sorted(k for r in records for k in r if k.startswith("eval/"))]
    keys = list(dict.fromkeys(keys))
    table = Table(*keys)
    for r in records[-args.last :]:
        table.add_row(
            *[f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        )
    console.print(table)
    return 0


def _show_sharding(run: RunDir, mesh: str | None) -> int:
    """The parameter layout of a run's model on its mesh (or ``mesh``), planned without
    devices: what each device would hold under the default logical-axis rules."""
    try:
        module, config, _ = run.load_experiment()
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exp = module.build(config)
    sample = first_examples(exp.train, 1)[exp.input_key]
    try:
        axes, rows = plan_sharding(
            exp.model,
            sample,
            mesh or getattr(config, "mesh", None),
            strategy=getattr(config, "strategy", "auto"),
        )
    except MeshError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = Table("parameter", "shape", "logical axes", "mesh axes", "bytes", "bytes / device")
    for r in rows:
        logical = ", ".join(str(n) for n in r["logical"]) if r["logical"] else "-"
        mesh_axes = ", ".join(str(a) for a in r["spec"]) if len(r["spec"]) else "replicated"
        table.add_row(
            r["parameter"],
            "x".join(map(str, r["shape"])) or "scalar",
            logical,
            mesh_axes,
            f"{r['bytes']:,}",
            f"{r['bytes_per_device']:,}",
        )
    total = sum(r["bytes"] for r in rows)
    per_device = sum(r["bytes_per_device"] for r in rows)
    table.add_row("total", "", "", "", f"{total:,}", f"{per_device:,}", style="bold")
    console = Console(width=160)
    shown = ",".join(f"{k}={v}" for k, v in axes.items())
    console.print(f"[bold]{run}[/]  mesh {shown} (default rules)")
    console.print(table)
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _export(args) -> int:
    step = "best" if args.best else args.step
    try:
        labels = _read_labels(args.labels) if args.labels else None
        out = export_run(
            args.run_dir,
            args.out,
            step=step,
            targets=args.target or ["xla"],
            platforms=args.platforms.split(","),
            batch_sizes=args.batch_sizes,
            fixed_batch=args.fixed_batch,
            precompile=not args.no_precompile,
            force=args.force or args.replace,
            replace=args.replace,
            onnx_opset=args.onnx_opset,
            iree_cpu=args.iree_cpu,
            iree_hal_targets=args.iree_hal_targets.split(",") if args.iree_hal_targets else None,
            labels=labels,
            quantize=args.quantize,
            max_metric_drop=args.max_metric_drop,
        )
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    report = inspect_artifact(out, analyze=False)
    step = report["experiment"].get("step")
    print(f"exported {report['name']} (step {step}) to {out}")
    print(f"  batch sizes {report['batch_sizes']}")
    for name, target in report["targets"].items():
        print(f"  target {name}: {_inspect_details(name, target)}")
        parity = target["parity"]
        for key, err in parity.get("max_abs_error", {}).items():
            rel = parity.get("max_rel_error", {}).get(key, float("nan"))
            print(f"    parity: {key} max abs error {err:.3g}, max rel error {rel:.3g}")
    print(_quantization_line(report))
    skipped = report["skipped_targets"]
    for name, why in skipped.items():
        print(f"warning: target {name} was skipped: {why}", file=sys.stderr)
    return 3 if skipped else 0


def _quantization_line(report: dict) -> str:
    q = report.get("quantization")
    if not q:
        return "  quantization: none (float weights)"
    drops = ", ".join(
        f"{t} {m['metric']:.2f}% ({-m['drop']:+.2f})" for t, m in q.get("targets", {}).items()
    )
    calibration = q.get("calibration")
    calibrated = (
        f", calibrated on {calibration['examples']} {calibration['source']} examples"
        if calibration
        else ""
    )
    line = (
        f"  quantization: {q['scheme']}{calibrated}, weights {q['weight_bytes']:,} of "
        f"{q['float_weight_bytes']:,} bytes; eval accuracy float {q['float_metric']:.2f}%, "
        f"{drops} on {q['eval_examples']} examples (max drop {q['max_metric_drop']:g})"
    )
    if "float_bits" in q:  # cross-entropy per label, recorded since bits were measured
        bits = ", ".join(f"{t} {m['bits']:.4f}" for t, m in q["targets"].items())
        line += f"; cross-entropy bits per label float {q['float_bits']:.4f}, {bits}"
    return line


def _read_labels(path: str) -> list[str]:
    """One class label per line of a UTF-8 text file (`ExportError` if unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"--labels {path}: cannot read it as UTF-8 text ({e})") from None


def _inspect_details(name: str, t: dict) -> str:
    if name == "xla":
        compiled = [p["platform"] + "/" + p["jaxlib"] for p in t["precompiled"]] or "none"
        return (
            f"platforms {t['platforms']}, precompiled {compiled}, expires {t['expires']} "
            f"({t['days_left']} days left)"
        )
    if name == "onnx":
        return f"{t['file']}, opset {t['opset']}"
    sizes = sorted({m["batch_size"] for m in t["modules"]})
    hal = sorted({m["hal_target"] for m in t["modules"]})
    return f"batch sizes {sizes} for {hal}, cpu {t['cpu']}"


def _inspect(args) -> int:
    try:
        report = inspect_artifact(args.artifact, analyze=not args.no_analysis)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    c = Console()
    c.print(
        f"[bold]{report['name']}[/]  format v{report['format_version']}  "
        f"exported {report['created']} with jax {report['versions']['jax']}"
    )
    targets = Table("target", "details", "max abs error", title="targets")
    for name, t in report["targets"].items():
        parity = t["parity"].get("max_abs_error", {})
        targets.add_row(
            name, _inspect_details(name, t), ", ".join(f"{v:.2g}" for v in parity.values())
        )
    for name, why in report["skipped_targets"].items():
        targets.add_row(name, f"[red]skipped[/]: {why}", "")
    c.print(targets)
    c.print(_quantization_line(report).strip())
    sig = Table("", "name", "dtype", "shape", title="signature")
    for kind in ("inputs", "outputs"):
        for t in report[kind]:
            sig.add_row(kind[:-1], t["name"], t["dtype"], str(tuple(t["shape"])))
    c.print(sig)
    files = Table("file", "bytes", title="files")
    for name, size in report["files"].items():
        files.add_row(name, f"{size:,}")
    c.print(files)
    if "analysis" in report:
        cost = Table(
            "batch", "GFLOPs", "MB accessed", "peak MB", title="XLA analysis (this platform)"
        )
        loops = any(a.get("loops_counted_once") for a in report["analysis"].values())
        at_least = ">= " if loops else ""
        for b, a in report["analysis"].items():
            cost.add_row(
                str(b),
                f"{at_least}{a['flops'] / 1e9:.4g}",
                f"{at_least}{a['bytes_accessed'] / 1e6:.4g}",
                f"{a.get('peak_memory_bytes', float('nan')) / 1e6:.4g}",
            )
        c.print(cost)
        if loops:
            c.print("the program has loops (scanned layers): XLA counts each loop's body once")
    return 0


# A user's mistake (a path that is not a run dir, a step that does not exist, a bad
# artifact...): one line naming it, exit code 2, never a traceback.
USER_ERRORS = (
    MissingExtra,
    ArtifactError,
    CheckpointError,
    DataError,
    DebugRunError,
    ExportError,
    FileNotFoundError,
    LossError,
    RunDirError,
    SweepError,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="jaxmint", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("info", help="versions and devices")
    p.set_defaults(fn=_info)
    p = sub.add_parser("show", help="summarize a run dir: checkpoints and the last logged steps")
    p.add_argument("run_dir")
    p.add_argument("--last", type=positive_int, default=10, help="how many logged steps to show")
    p.add_argument(
        "--sharding",
        action="store_true",
        help="each parameter's logical axes, mesh axes and bytes per device on the run's mesh",
    )
    p.add_argument(
        "--mesh",
        metavar="SPEC",
        help="with --sharding: a mesh to plan for instead of the run's, "
        "e.g. data=2,fsdp=2,tensor=2",
    )
    p.set_defaults(fn=_show)
    p = sub.add_parser("export", help="lower a run's model into an artifact directory")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="artifact directory to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    which.add_argument("--best", action="store_true", help="the best kept checkpoint")
    p.add_argument("--platforms", default="cpu", help="comma-separated: cpu,cuda,rocm,tpu")
    p.add_argument(
        "--batch-sizes",
        type=_ints,
        default=[1, 8, 32],
        help="declared batch sizes, comma-separated (default: 1,8,32)",
    )
    p.add_argument(
        "--fixed-batch",
        action="store_true",
        help="one module per declared batch size instead of a symbolic batch",
    )
    p.add_argument(
        "--no-precompile",
        action="store_true",
        help="ship no precompiled executables (smaller, slower first call)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=None,
        metavar="NAME",
        help="xla, onnx or iree; repeat or comma-separate for several (default: xla)",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "bf16", "int8-weights", "int8"],
        default="none",
        help="bf16, int8-weights: store the weights as bfloat16 or int8 with per-channel "
        "scales, dequantized in the graph, for every target; int8: ONNX Runtime's static "
        "int8 of weights and activations, calibrated on 256 training inputs (onnx target "
        "only) (default: none)",
    )
    p.add_argument(
        "--max-metric-drop",
        type=float,
        default=0.5,
        metavar="POINTS",
        help="refuse a quantized target whose eval accuracy is more than this many points "
        "below the float model's (default %(default)s)",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="class labels, one per line, for the classification extension of the server "
        "(default: the experiment's labels, if it has any)",
    )
    p.add_argument(
        "--onnx-opset",
        type=int,
        default=DEFAULT_ONNX_OPSET,
        help="ONNX opset of the onnx target (default %(default)s)",
    )
    p.add_argument(
        "--iree-cpu",
        default=None,
        help="LLVM CPU of IREE's llvm-cpu modules: x86-64-v3 (default on x86), generic, "
        "host, or a CPU name",
    )
    p.add_argument(
        "--iree-hal-targets",
        default=None,
        help="comma-separated IREE HAL targets (default: llvm-cpu, and vulkan-spirv when "
        "the compiler has it)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing artifact (refused if the new one would have fewer targets)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="replace an existing artifact even with fewer targets (implies --force)",
    )
    p.set_defaults(fn=_export)
    p = sub.add_parser("inspect", help="signature, files, versions, expiry and cost of an artifact")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-analysis", action="store_true", help="skip XLA's cost analysis")
    p.set_defaults(fn=_inspect)

    add_data_parsers(sub)

    add_debug_parsers(sub)

    add_sweep_parsers(sub)

    add_diagnose_parsers(sub)
    args, unknown = parser.parse_known_args(argv)
    command = sub.choices[args.command]
    if unknown:  # named by the subcommand, not by the top-level parser
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        print(f"jaxmint {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
