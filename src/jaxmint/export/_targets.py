"""Export targets beyond XLA: ONNX through jax2onnx and IREE through iree-base-compiler.

Each writer takes the predict function with its weights and writes its files into
the artifact directory being assembled; it raises `TargetSkipped`, naming the
operation and the layer, when the model uses something its toolchain cannot
convert. The exporter then skips only that target.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import platform
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxmint.export._lower import ExportError, lower, no_source_paths
from jaxmint_runtime.backends import host_cpu_flags

TARGETS = ("xla", "onnx", "iree")
DEFAULT_ONNX_OPSET = 21
# Needed at export (the converter) and for the parity check (the runtime backend).
_NEEDS = {
    "xla": (),  # jax: a dependency of jaxmint itself
    "onnx": ("jax2onnx", "onnx", "onnxruntime"),
    "iree": ("iree.compiler", "iree.runtime"),
}
# x86-64-v3 (AVX2, FMA; every x86 server CPU since 2013) is fast and portable;
# "host" is the fastest but runs only where the exporting CPU's features are.
_X86_V3_FLAGS = ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe")
# Instruction-set flags of /proc/cpuinfo (not "hypervisor", "constant_tsc", ...).
_ISA_FLAG = re.compile(
    r"^(sse|ssse|avx|fma|bmi|f16c|movbe|abm|lzcnt|popcnt|aes|pclmul|sha|adx|vaes|vpclmul"
    r"|gfni|amx|asimd|sve|neon|fp16)"
)


class TargetSkipped(Exception):
    """This target cannot represent the model; the message names the op and the layer."""


@dataclass(frozen=True)
class Job:
    """What every target writer needs to know about the model being exported."""

    name: str
    predict: Callable
    weights: list[np.ndarray]
    sample: np.ndarray
    input_key: str
    output_names: list[str]
    single_output: bool
    batch_sizes: list[int]

    def closed(self) -> Callable:
        """``x -> outputs`` with the weights as constants, outputs in manifest order."""
        consts = [jax.numpy.asarray(w) for w in self.weights]

        def fn(x):
            out = self.predict(consts, {self.input_key: x})
            return out if self.single_output else tuple(out[k] for k in self.output_names)

        return fn


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """``"xla,onnx"`` or ``["xla", "onnx"]`` -> known, deduplicated target names."""
    names = [targets] if isinstance(targets, str) else list(targets)
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise ExportError(f"unknown export targets {bad or names}; choose from {list(TARGETS)}")
    return list(dict.fromkeys(names))


def check_installed(targets: Sequence[str]) -> None:
    """Refuse early, naming the pip command, when a target's extra is not installed."""
    for t in targets:
        missing = [m for m in _NEEDS[t] if not _importable(m)]
        if missing:
            raise ExportError(
                f"export target {t!r} needs {missing}, which are not installed: "
                f"pip install 'jaxmint[{t}]'"
            )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- where an operation comes from -----------------------------------------------------


def _eqns(jaxpr, stack: str = ""):
    """Every equation of a jaxpr and its sub-jaxprs, with its layer path."""
    for eqn in jaxpr.eqns:
        here = "/".join(p for p in (stack, str(eqn.source_info.name_stack)) if p)
        yield eqn.primitive.name, here
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner, here)


def _layers_using(job: Job, message: str) -> tuple[str | None, list[str]]:
    """The primitive a converter's error message names, and the layers that use it."""
    jaxpr = jax.make_jaxpr(job.closed())(job.sample).jaxpr
    uses: dict[str, list[str]] = {}
    for prim, layer in _eqns(jaxpr):
        uses.setdefault(prim, [])
        if layer not in uses[prim]:
            uses[prim].append(layer)
    named = [p for p in uses if re.search(rf"(?<![\w.]){re.escape(p)}(?![\w])", message)]
    if not named:
        return None, []
    prim = max(named, key=len)  # "reduce_max" over "max"
    return prim, uses[prim]


def _where(layers: list[str]) -> str:
    if not layers:
        return "at the top level"
    shown = ", ".join(repr(layer or "<top level>") for layer in layers[:3])
    return f"in layer {shown}" + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")


# -- ONNX -------------------------------------------------------------------------------


def write_onnx(directory: Path, job: Job, *, opset: int = DEFAULT_ONNX_OPSET) -> dict:
    """Convert with jax2onnx (symbolic batch), weights as external data under ``onnx/``."""
    import onnx

    batch = jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((batch, *job.sample.shape[1:]), job.sample.dtype)
    try:
        model = convert_onnx(job, spec, opset)
    except Exception as e:
        message = f"{type(e).__name__}: {e}".strip()
        prim, layers = _layers_using(job, message)
        op = f"op {prim!r} {_where(layers)}" if prim else "the model"
        raise TargetSkipped(
            f"jax2onnx {_version('jax2onnx')} cannot convert {op}: {_first_line(message)}"
        ) from None
    folder = directory / "onnx"
    folder.mkdir()
    return {
        "file": "onnx/model.onnx",
        "files": save_onnx(model, folder),
        "opset": opset,
        "versions": {"jax2onnx": _version("jax2onnx"), "onnx": onnx.__version__},
    }


def save_onnx(model, folder: Path) -> list[str]:
    """Write ``model`` as ``folder/model.onnx``, its large tensors in ``model.onnx.data``
    (replacing what is there); the files written, relative to the artifact."""
    import onnx

    for old in folder.iterdir():
        old.unlink()
    onnx.save_model(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    names = ("model.onnx", "model.onnx.data")
    return [f"onnx/{name}" for name in names if (folder / name).exists()]


# jax2onnx's plugin trees that an export needs: its predict function is traced to jax
# primitives (flax's modules too); jax2onnx's equinox tree, whose import builds example
# models, and its examples are left out.
_ONNX_PLUGIN_TREES = ("jax", "flax")


def _load_onnx_plugins() -> None:
    """Import the converter's plugins for `_ONNX_PLUGIN_TREES` only, once per process.

    Without this, jax2onnx imports every plugin it ships on its first conversion, most
    of a conversion's time for a small model. With a jax2onnx whose plugin registry
    differs from the one this was written for, its own full import runs instead.
    """
    try:
        from jax2onnx.plugins import plugin_system
    except ImportError:
        return
    import_tree = getattr(plugin_system, "_import_tree", None)
    if import_tree is None or getattr(plugin_system, "_already_imported_plugins", True):
        return
    root = Path(plugin_system.__file__).parent
    for tree in _ONNX_PLUGIN_TREES:
        import_tree(root / tree, f"jax2onnx.plugins.{tree}")
    plugin_system._already_imported_plugins = True


def convert_onnx(job: Job, spec, opset: int):
    """The ONNX ``ModelProto`` of ``job``'s predict function (weights as initializers)."""
    from jax2onnx import to_onnx

    _load_onnx_plugins()

    # onnx_ir logs a warning per untyped shape constant it leaves out; they are noise here.
    quiet = logging.getLogger("onnx_ir")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with no_source_paths():
            return to_onnx(
                job.closed(),
                [spec],
                model_name=job.name,
                opset=opset,
                input_names=[job.input_key],
                output_names=job.output_names,
            )
    finally:
        quiet.setLevel(level)


# -- IREE -------------------------------------------------------------------------------


def default_iree_cpu() -> str:
    return "x86-64-v3" if platform.machine().lower() in ("x86_64", "amd64") else "generic"


def cpu_flags_required(cpu: str) -> list[str]:
    """The /proc/cpuinfo flags a module compiled for ``cpu`` needs at run time."""
    if cpu == "x86-64-v3":
        return list(_X86_V3_FLAGS)
    if cpu == "host":
        return sorted(f for f in host_cpu_flags() or () if _ISA_FLAG.match(f))
    return []  # generic, or a named CPU: not checked at load (see docs/deployment.md)


def write_iree(
    directory: Path,
    job: Job,
    *,
    hal_targets: Sequence[str] | None = None,
    cpu: str | None = None,
) -> dict:
    """Compile the StableHLO of ``jax.export`` with IREE, one module per declared batch
    size and HAL target (``llvm-cpu``, and ``vulkan-spirv`` when the compiler has it)."""
    import iree.compiler as ireec

    if not job.batch_sizes:
        raise TargetSkipped("IREE modules have static shapes: declare batch sizes (--batch-sizes)")
    available = set(ireec.query_available_targets())
    if hal_targets is None:
        hal_targets = ["llvm-cpu"] + (["vulkan-spirv"] if "vulkan-spirv" in available else [])
    unknown = [t for t in hal_targets if t not in available]
    if unknown:
        raise ExportError(
            f"IREE HAL targets {unknown} are not in this compiler ({sorted(available)})"
        )
    cpu = cpu or default_iree_cpu()
    modules, notes = [], []
    for b in job.batch_sizes:
        exported = lower(
            job.predict,
            job.weights,
            job.sample,
            job.input_key,
            platforms=("cpu",),
            batch_size=b,
            keep_unused=True,  # main takes every weight, as the runtime passes them
        )
        text = exported.mlir_module()
        _check_custom_calls(text)
        for hal in hal_targets:
            args = [f"--iree-llvmcpu-target-cpu={cpu}"] if hal == "llvm-cpu" else []
            try:
                binary = ireec.compile_str(
                    text, target_backends=[hal], input_type="stablehlo", extra_args=args
                )
            except Exception as e:
                message = _iree_error(str(e))
                if hal != "llvm-cpu":  # an optional GPU target: leave it out, keep the CPU one
                    notes.append(f"{hal} left out: {message}")
                    hal_targets = [t for t in hal_targets if t != hal]
                    modules = [m for m in modules if m["hal_target"] != hal]
                    shutil.rmtree(directory / "iree" / hal, ignore_errors=True)
                    continue
                raise TargetSkipped(f"iree-compile cannot compile the model: {message}") from None
            rel = f"iree/{hal}/module-b{b}.vmfb"
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_bytes(binary)
            modules.append({"file": rel, "batch_size": b, "hal_target": hal})
    return {
        "modules": modules,
        "cpu": cpu,
        "cpu_flags": cpu_flags_required(cpu),
        "versions": {"iree-base-compiler": _version("iree-base-compiler")},
        "notes": notes,
    }


_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.$-]+)\(.*loc\((#loc\d+)\)")
_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)\(")
_CALL = re.compile(r"call @([\w.$-]+)\(.*loc\((#loc\d+)\)")
_LOC = re.compile(r'^(#loc\d+) = loc\("([^"]*)"')


def _check_custom_calls(text: str) -> None:
    """Refuse custom calls (LAPACK, cuDNN...) that IREE cannot compile, naming the layer."""
    locs = {m.group(1): m.group(2) for m in map(_LOC.match, text.splitlines()) if m}
    callers: dict[str, str] = {}
    for line in text.splitlines():
        if m := _CALL.search(line):
            callers.setdefault(m.group(1), locs.get(m.group(2), ""))
    func = None
    for line in text.splitlines():
        if m := _FUNC.search(line):
            func = m.group(1)
        m = _CUSTOM_CALL.search(line)
        if not m or m.group(1) == "shape_assertion":
            continue
        where = locs.get(m.group(2), "")
        if "/" not in where and func in callers:  # inside a called function: where it is called
            where = callers[func]
        layer = "/".join(where.split("/")[1:]) if "/" in where else where
        raise TargetSkipped(
            f"IREE cannot compile op {m.group(1)!r} (a custom call) in layer {layer!r}"
        )


def _iree_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    return (lines[0] if lines else _first_line(text))[:500]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:500] if text.strip() else "(no message)"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__all__: list[Any] = [
    "DEFAULT_ONNX_OPSET",
    "TARGETS",
    "Job",
    "TargetSkipped",
    "check_installed",
    "parse_targets",
    "write_iree",
    "write_onnx",
]
