"""Write an artifact directory: modules, weights, precompiled executables, manifest.

The directory is assembled next to its destination and moved into place only
after the parity check passed, so a failed export never leaves a half-written
artifact nor touches an existing one.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from jaxmint.export._lower import ExportError, lower, output_specs, predict_function
from jaxmint.export._quantize import (
    MAX_EVAL_EXAMPLES,
    STATIC,
    calibration_inputs,
    check_scheme,
    jax_runner,
    quantize_onnx_static,
    task_metric,
)
from jaxmint.export._quantize import quantize as quantize_weights
from jaxmint.export._targets import (
    DEFAULT_ONNX_OPSET,
    Job,
    TargetSkipped,
    check_installed,
    parse_targets,
    write_iree,
    write_onnx,
)
from jaxmint_runtime import load as runtime_load
from jaxmint_runtime._format import (
    CHECK,
    COMPAT_DAYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    sha256_file,
    tolerance,
    write_safetensors,
)

log = logging.getLogger("jaxmint")

DEFAULT_BATCH_SIZES = (1, 8, 32)


def config_hash(config: Mapping[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def export_model(
    model,
    variables: Mapping[str, Any],
    sample: np.ndarray,
    out: str | os.PathLike,
    *,
    name: str,
    input_key: str = "x",
    targets: str | Sequence[str] = ("xla",),
    platforms: Sequence[str] = ("cpu",),
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    fixed_batch: bool = False,
    precompile: bool = True,
    force: bool = False,
    replace: bool = False,
    experiment: Mapping[str, Any] | None = None,
    onnx_opset: int = DEFAULT_ONNX_OPSET,
    iree_hal_targets: Sequence[str] | None = None,
    iree_cpu: str | None = None,
    labels: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    quantize: str = "none",
    eval_data: Mapping[str, Any] | None = None,
    max_metric_drop: float = 0.5,
    calibration_data: Any = None,
    calibration_source: str = "given",
) -> Path:
    """Export ``model.apply(variables, x, train=False)`` to an artifact directory.

    Args:
      sample: a few real inputs ``(n, ...)``; they fix the non-batch shape and
        dtype and feed the parity check.
      targets: any of ``"xla"`` (``jax.export`` modules), ``"onnx"`` (jax2onnx,
        symbolic batch) and ``"iree"`` (iree-base-compiler, one module per
        declared batch size). A target whose toolchain cannot convert an op, or
        whose outputs fail the parity check, is skipped (the reason is in the
        manifest's ``skipped_targets``); if every target fails, nothing is written.
      platforms: XLA lowering targets, e.g. ``("cpu", "cuda")``.
      batch_sizes: declared batch sizes: precompiled (on the exporting platform,
        when it is in ``platforms``), compiled by IREE, and the sizes smaller
        batches are padded to.
      fixed_batch: one XLA module per declared size instead of one symbolic module.
      force: replace an existing artifact at ``out`` (only once the new one passed,
        and only if it keeps every target the old one has).
      replace: with ``force``, let the new artifact have fewer targets than the old.
      experiment: recorded in the manifest (name, config hash, step).
      onnx_opset: the ONNX opset to convert to.
      iree_hal_targets: IREE HAL targets (default ``llvm-cpu``, plus
        ``vulkan-spirv`` when the compiler has it).
      iree_cpu: LLVM CPU for ``llvm-cpu`` modules: ``x86-64-v3`` on x86 (default),
        ``generic``, ``host`` or any CPU name clang knows.
      labels: class names, one per entry of the output's last dimension, written
        to ``labels.txt`` for the server's classification extension; a mapping
        ``{output name: names}`` for a model with several outputs.
      quantize: ``"none"``, ``"bf16"`` or ``"int8-weights"``: weight-only
        quantization for every target; ``"int8"``: ONNX Runtime's static int8
        quantization of the onnx target, calibrated on ``calibration_data`` (see
        `jaxmint.export._quantize`). Each target is then measured on ``eval_data``
        (``{input_key: x, "y": labels}``) and refused if its accuracy is more than
        ``max_metric_drop`` percentage points below the float model's.
      calibration_data: for ``"int8"``: inputs (an array, or a dict holding
        ``input_key``), of which the first 256 set the activation ranges;
        ``calibration_source`` names them in the manifest.

    Example::

        path = export_model(model, variables, test["x"][:8], "artifacts/mlp", name="mlp")
    """
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} already exists and is not empty; pass --force to replace it")
    targets = parse_targets(targets)
    if force and not replace:
        dropped = sorted(_existing_targets(out) - set(targets))
        if dropped:
            keep = ",".join(sorted(_existing_targets(out) | set(targets)))
            raise ExportError(
                f"{out} has the targets {', '.join(dropped)} that this export would drop; "
                f"export them too (--target {keep}), or pass --replace to drop them"
            )
    check_scheme(quantize, targets)
    check_installed(targets)
    sample = np.asarray(sample)
    if sample.ndim < 1 or sample.shape[0] < 1:
        raise ExportError(f"the sample input needs a batch axis with examples, got {sample.shape}")
    static = quantize == STATIC
    if static:
        calibration = calibration_inputs(calibration_data, input_key, sample)
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if any(b < 1 for b in batch_sizes) or (fixed_batch and not batch_sizes):
        raise ExportError(f"batch sizes must be positive integers, got {batch_sizes}")
    platforms = list(dict.fromkeys(platforms))

    predict, names, weights = predict_function(model, variables, input_key)
    weights = [np.asarray(jax.device_get(w)) for w in weights]
    outputs, single = output_specs(predict, weights, sample, input_key)
    label_files = _label_files(labels, outputs)  # checked before anything is compiled
    quantization, measure = None, None
    if quantize != "none":
        if not max_metric_drop >= 0:
            raise ExportError(f"max_metric_drop must be >= 0, got {max_metric_drop}")
        output_names = [o["name"] for o in outputs]
        measure = task_metric(eval_data, input_key, output_names)
        reference = measure(jax_runner(predict, weights, input_key, single, output_names[0]))
        if static:  # the float graph is converted, then quantized by ONNX Runtime
            float_bytes = sum(w.nbytes for w in weights)
            quantization = {"scheme": quantize, "float_weight_bytes": float_bytes}
        else:
            predict, names, weights, quantization = quantize_weights(
                predict, names, weights, quantize
            )
        quantization.update(
            metric="accuracy",
            float_metric=reference["accuracy"],
            float_bits=reference["bits"],
            eval_examples=min(len(eval_data["y"]), MAX_EVAL_EXAMPLES),
            max_metric_drop=max_metric_drop,
            targets={},
        )
    modules = {}
    if "xla" in targets:
        sizes = batch_sizes if fixed_batch else [None]
        modules = {
            b: lower(predict, weights, sample, input_key, platforms=platforms, batch_size=b)
            for b in sizes
        }
    in_shape = ["batch", *sample.shape[1:]]
    job = Job(
        name=name,
        predict=predict,
        weights=weights,
        sample=sample,
        input_key=input_key,
        output_names=[o["name"] for o in outputs],
        single_output=single,
        batch_sizes=batch_sizes,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        written, skipped = {}, {}
        for target in targets:
            try:
                if target == "xla":
                    written[target] = _write_xla(tmp, modules, platforms)
                elif target == "onnx":
                    written[target] = write_onnx(tmp, job, opset=onnx_opset)
                    if static:
                        files, report = _quantize_onnx(tmp, calibration, input_key)
                        report["calibration"]["source"] = calibration_source
                        quantization.update(report)
                        written[target]["files"] = files
                else:
                    written[target] = write_iree(
                        tmp, job, hal_targets=iree_hal_targets, cpu=iree_cpu
                    )
            except TargetSkipped as e:
                skipped[target] = str(e)
                _remove_target(tmp, target)
        check_x = {input_key: sample[: min(4, sample.shape[0])]}
        if static and "onnx" in written:  # the check sample holds the int8 graph's answers
            answers = _onnx_answers(tmp, check_x)
        else:
            answers = jax.device_get(jax.jit(predict)(weights, check_x))
            answers = {outputs[0]["name"]: answers} if single else answers
        _write_check(tmp, check_x, answers)
        for spec in outputs:
            if spec["name"] in label_files:
                file, lines = label_files[spec["name"]]
                (tmp / file).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
                spec["labels"] = file
        if "xla" in written or "iree" in written:
            write_safetensors(tmp / WEIGHTS, dict(zip(names, weights, strict=True)))
        created = dt.datetime.now(dt.UTC)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": name,
            "created": created.isoformat(timespec="seconds"),
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
            "inputs": [_input_spec(model, input_key, sample, in_shape)],
            "outputs": outputs,
            "single_output": single,
            "batch_sizes": batch_sizes,
            "weights": {"file": WEIGHTS, "order": names},
            "experiment": dict(experiment or {}),
            "targets": written,
            "skipped_targets": skipped,
            "check": {"file": CHECK, "source": "onnx" if static else "jax"},
        }
        if quantization is not None:
            manifest["quantization"] = quantization
        _write_manifest(tmp, manifest, final=False)
        checker = _Parity(predict, weights, sample, input_key, batch_sizes)
        for target in list(written):
            try:
                written[target]["parity"] = checker.check(tmp, target, judge=not static)
                if target == "iree":
                    _check_iree_gpu_modules(tmp, written[target], checker, manifest)
                if quantization is not None:
                    _judge_metric(tmp, target, input_key, measure, quantization)
            except ParityError as e:
                skipped[target] = str(e)
                del written[target]
                _remove_target(tmp, target)
                _write_manifest(tmp, manifest, final=False)  # the draft lists what is left
        reasons = "\n".join(f"  {t}: {why}" for t, why in skipped.items())
        if not written:
            raise ExportError(f"no target could be exported; nothing was written:\n{reasons}")
        if skipped and out.exists() and any(out.iterdir()) and not replace:
            raise ExportError(
                f"{out} was kept: the new export lacks targets it was asked for, and replacing "
                f"an artifact must not lose any:\n{reasons}\nExport the targets that work "
                f"(--target {','.join(written)}) to replace it, or write to another --out."
            )
        if "xla" not in written and "iree" not in written:
            (tmp / WEIGHTS).unlink(missing_ok=True)
            del manifest["weights"]  # the ONNX graph holds its own
        here = jax.devices()[0].platform
        if "xla" in written and precompile and batch_sizes and here in platforms:
            written["xla"]["precompiled"] = [_precompile(tmp)]
        _write_manifest(tmp, manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for target, why in skipped.items():
        log.warning("export target %s skipped: %s", target, why)
    return out


def _write_check(directory: Path, inputs: dict, answers: dict) -> None:
    """A few sample inputs and the exported function's outputs for them (jax's, or a
    statically quantized graph's own): every runtime load can check a target with
    `Predictor.self_check`."""
    tensors = {f"input/{k}": np.asarray(v) for k, v in inputs.items()}
    tensors.update({f"output/{k}": np.asarray(v) for k, v in answers.items()})
    write_safetensors(directory / CHECK, tensors)


def _label_files(labels, outputs: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """{output name: (file name, labels)}, each list checked against its output."""
    if labels is None:
        return {}
    names = [o["name"] for o in outputs]
    if not isinstance(labels, Mapping):
        if isinstance(labels, str) or len(outputs) != 1:
            raise ExportError(
                f"labels must be a list of class names for the one output, or a mapping "
                f"{{output name: names}} for the outputs {names}"
            )
        labels = {names[0]: labels}
    files = {}
    for name, given in labels.items():
        if name not in names:
            raise ExportError(f"labels are given for {name!r}; the model's outputs are {names}")
        spec = outputs[names.index(name)]
        given = list(given)
        classes = spec["shape"][-1] if spec["shape"] else None
        if not isinstance(classes, int) or len(given) != classes:
            raise ExportError(
                f"{len(given)} labels for output {name!r} of shape {spec['shape']}; give one "
                "per entry of its last dimension"
            )
        for i, label in enumerate(given):
            if not isinstance(label, str) or len(label) > 1024 or not label.isprintable():
                raise ExportError(
                    f"label {i} of output {name!r} is {str(label)[:40]!r}; labels are "
                    "printable strings of at most 1024 characters, without line breaks"
                )
        index = names.index(name)
        files[name] = ("labels.txt" if index == 0 else f"labels-{index}.txt", given)
    return files


def _input_spec(model, input_key: str, sample: np.ndarray, shape: list) -> dict:
    """The manifest's input entry, with the model's declared integer range if any."""
    spec = {"name": input_key, "dtype": str(sample.dtype), "shape": shape}
    bounds = getattr(model, "input_range", None)
    if bounds is not None and sample.dtype.kind in "iu":
        spec["range"] = [int(bounds[0]), int(bounds[1])]
    return spec


def _existing_targets(out: Path) -> set[str]:
    """The targets of the artifact at ``out`` (none when there is no readable one)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return {str(t) for t in manifest.get("targets", {})}
    except (OSError, ValueError, AttributeError):
        return set()


def _check_iree_gpu_modules(directory: Path, target: dict, checker: _Parity, manifest) -> None:
    """Check IREE's Vulkan modules where this machine can run them; drop them if they fail.

    ``target["parity"]`` is the CPU modules'; each module records ``parity_checked``.
    """
    gpu = [m for m in target["modules"] if m["hal_target"] == "vulkan-spirv"]
    for m in target["modules"]:
        m["parity_checked"] = m["hal_target"] == "llvm-cpu"
    if not gpu or not _iree_driver_usable("vulkan"):
        return
    try:
        target["parity_vulkan"] = checker.check(directory, "iree", iree_driver="vulkan")
    except ParityError as e:
        target["modules"] = [m for m in target["modules"] if m["hal_target"] != "vulkan-spirv"]
        shutil.rmtree(directory / "iree" / "vulkan-spirv", ignore_errors=True)
        target["notes"].append(f"vulkan-spirv left out: {e}")
        _write_manifest(directory, manifest, final=False)
        return
    for m in gpu:
        m["parity_checked"] = True


def _iree_driver_usable(driver: str) -> bool:
    import iree.runtime

    try:
        iree.runtime.Config(driver)
    except Exception:  # no such driver, or no device for it
        return False
    return True


class ParityError(ExportError):
    """A target's outputs differ from the jitted original beyond the tolerance."""


def _write_xla(directory: Path, modules: dict, platforms: list[str]) -> dict:
    entries = []
    for b, exported in modules.items():
        fname = "module.jaxexport" if b is None else f"module-b{b}.jaxexport"
        (directory / fname).write_bytes(exported.serialize())
        entries.append({"file": fname, "batch_size": b})
    created = dt.datetime.now(dt.UTC).date()
    return {
        "modules": entries,
        "platforms": platforms,
        "expires": (created + dt.timedelta(days=COMPAT_DAYS)).isoformat(),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
        "precompiled": [],
    }


def _remove_target(directory: Path, target: str) -> None:
    """Delete what a target wrote (XLA's modules and executables; the others' folder)."""
    if target == "xla":
        for path in [*directory.glob("module*.jaxexport"), directory / "compiled"]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    else:
        shutil.rmtree(directory / target, ignore_errors=True)


def _write_manifest(directory: Path, manifest: dict, *, final: bool = True) -> None:
    """Write the manifest; the ``final`` one lists every file with its sha256. A draft,
    read by the parity check with ``verify=False`` (sizes and confinement checked, not
    hashes), lists a placeholder digest: the weights are not hashed twice."""
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST:
            digest = sha256_file(path) if final else "0" * 64
            files[rel] = {"sha256": digest, "bytes": path.stat().st_size}
    manifest["files"] = files
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _quantize_onnx(directory: Path, calibration: np.ndarray, input_key: str):
    """ONNX Runtime's static int8 of the onnx target; `TargetSkipped` if its tools fail."""
    try:
        return quantize_onnx_static(directory / "onnx", calibration, input_key)
    except Exception as e:  # onnxruntime's tools raise whatever their steps raise
        raise TargetSkipped(f"ONNX Runtime's static int8 quantization failed: {e}") from None


def _onnx_answers(directory: Path, inputs: dict) -> dict:
    """``{output: array}`` of the onnx target as written (no manifest yet) for ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(directory / "onnx/model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def _judge_metric(directory: Path, target: str, input_key: str, measure, quantization) -> None:
    """Record ``target``'s accuracy on the eval data; `ParityError` if it dropped too far."""
    predictor = _load_target(directory, target)
    measured = measure(lambda x: predictor.run({input_key: x}))
    value = measured["accuracy"]
    drop = quantization["float_metric"] - value
    quantization["targets"][target] = {"metric": value, "drop": drop, "bits": measured["bits"]}
    if drop > quantization["max_metric_drop"]:
        del quantization["targets"][target]
        raise ParityError(
            f"{quantization['scheme']} costs the {target} target {drop:.2f} points of eval "
            f"accuracy ({value:.2f}% against {quantization['float_metric']:.2f}% in float), "
            f"more than the {quantization['max_metric_drop']:g} allowed (--max-metric-drop). "
            f"The {target} target was not written."
        )


def _load_target(directory: Path, target: str, *, iree_driver: str = "local-sync"):
    """``target`` through the runtime on CPU engines, whatever the shell's environment says."""
    try:
        return runtime_load(
            directory,
            backend=target,
            precompiled=False,
            warmup=False,
            allow_expired=True,
            check_finite=False,
            verify=False,
            iree_driver=iree_driver,
            onnx_providers=["CPUExecutionProvider"],
        )
    except Exception as e:
        why = str(e).replace(f"{directory}/", "")  # the temporary directory is noise
        raise ParityError(f"the runtime cannot load the {target} target: {why}") from None


class _Parity:
    """Each target, loaded through the runtime, against the jitted original function.

    Batch sizes checked: 1, the whole sample, the declared sizes it covers and one
    undeclared size (which exercises padding). The report holds, per output, the
    largest absolute difference and the largest difference relative to the
    output's largest magnitude.
    """

    def __init__(self, predict, weights, sample, input_key, batch_sizes):
        self.sample, self.input_key = sample, input_key
        sizes = {1, sample.shape[0], *[b for b in batch_sizes if b <= sample.shape[0]]}
        if sample.shape[0] > 2:
            sizes.add(sample.shape[0] - 1)
        self.sizes = sorted(sizes)
        reference = jax.jit(predict)
        self.expected = {}
        for n in self.sizes:
            want = jax.device_get(reference(weights, {input_key: sample[:n]}))
            self.expected[n] = want

    def check(
        self, directory: Path, target: str, *, iree_driver: str = "local-sync", judge=True
    ) -> dict:
        """Compare ``target`` with the original on CPU engines (ONNX Runtime's CPU provider,
        IREE's ``iree_driver``), whatever the exporting shell's environment says.
        ``judge=False`` (a statically quantized target) records the errors without
        holding them to the float tolerance; shapes and dtypes must still match."""
        predictor = _load_target(directory, target, iree_driver=iree_driver)
        abs_err, rel_err = {}, {}
        for n in self.sizes:
            try:
                got = predictor.run({self.input_key: self.sample[:n]})
            except Exception as e:
                raise ParityError(
                    f"the {target} target fails at batch size {n}: {type(e).__name__}: {e}"
                ) from None
            want = self.expected[n]
            if predictor.single_output:
                want = {predictor.outputs[0].name: want}
            for key, w in want.items():
                w, g = np.asarray(w), got[key]
                rtol, atol = tolerance(w.dtype)
                peak = float(np.max(np.abs(w.astype(np.float64)))) if w.size else 0.0
                scale = max(1.0, peak)
                if g.shape != w.shape or g.dtype != w.dtype:
                    raise ParityError(
                        f"the {target} target returns {key!r} as {g.dtype}{list(g.shape)} at batch "
                        f"size {n}, the original as {w.dtype}{list(w.shape)}. The {target} target "
                        "was not written."
                    )
                diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
                err = float(np.max(diff)) if w.size else 0.0
                if judge and not np.allclose(g, w, rtol=rtol, atol=atol * scale):
                    raise ParityError(
                        f"parity check failed for output {key!r} at batch size {n}: max abs "
                        f"difference {err:.3g} (tolerance rtol={rtol}, atol={atol * scale:.3g}). "
                        f"The {target} target was not written."
                    )
                abs_err[key] = max(abs_err.get(key, 0.0), err)
                rel_err[key] = max(rel_err.get(key, 0.0), err / peak if peak else 0.0)
        return {
            "max_abs_error": abs_err,
            "max_rel_error": rel_err,
            "batch_sizes_checked": self.sizes,
        }


def _precompile(directory: Path) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="jaxmint-precompile-"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jaxmint_runtime.precompile", str(directory), str(cache)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise ExportError(f"precompiling failed:\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        platform = info["platform"]
        target = directory / "compiled" / platform
        target.mkdir(parents=True, exist_ok=True)
        files = []
        for entry in info.pop("entries"):
            shutil.copyfile(cache / entry, target / entry)
            files.append(f"compiled/{platform}/{entry}")
        return {**info, "files": files}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Put the finished artifact at ``out``. Replacing one, the two directories swap in
    one step where the OS can (Linux ``renameat2``), so a server polling ``out`` never
    sees it missing; elsewhere the old one is renamed aside first."""
    if not out.exists():
        tmp.rename(out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # it holds the old artifact now
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux 3.15+, most local filesystems); False if not."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28)
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
