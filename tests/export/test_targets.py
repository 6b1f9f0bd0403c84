"""Export targets (XLA, ONNX, IREE) and the runtime backends that load them."""

from __future__ import annotations

import importlib.util
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmint
import jaxmint_runtime
from jaxmint.export import ExportError, export_model
from jaxmint.export import _targets as targets_module
from jaxmint_runtime import ArtifactError, backends
from jaxmint_runtime.backends import _iree

ALL = ("xla", "onnx", "iree")


def _models():
    rng = np.random.default_rng(0)
    return {
        "mlp": (jaxmint.models.mlp((32, 32), 10, dropout=0.1), rng.normal(size=(6, 64))),
        "cnn": (jaxmint.models.cnn((8, 16), 10), rng.normal(size=(6, 8, 8, 1))),
        "transformer": (
            jaxmint.models.transformer(64, max_len=16, d_model=16, num_layers=1, num_heads=2),
            rng.integers(0, 64, size=(6, 16)),
        ),
        "portable_transformer": (
            jaxmint.models.transformer(
                64,
                max_len=16,
                d_model=16,
                num_layers=1,
                num_heads=2,
                attention=jaxmint.models.portable_attention,
            ),
            rng.integers(0, 64, size=(6, 16)),
        ),
        "chunked_transformer": (
            jaxmint.models.transformer(
                64,
                max_len=16,
                d_model=16,
                num_layers=1,
                num_heads=2,
                attention=jaxmint.models.chunked_attention(8),
            ),
            rng.integers(0, 64, size=(6, 16)),
        ),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported once to every target: {name: (artifact, reference fn, inputs)}."""
    out = {}
    for name, (model, x) in _models().items():
        x = x.astype(np.int32 if x.dtype.kind == "i" else np.float32)
        variables = model.init(jax.random.key(0), x)
        path = export_model(
            model,
            variables,
            x[:4],
            tmp_path_factory.mktemp("targets") / name,
            name=name,
            targets=ALL,
            batch_sizes=(1, 4),
            precompile=False,
            iree_hal_targets=["llvm-cpu"],
        )
        reference = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
        out[name] = (path, lambda x, v=variables, f=reference: np.asarray(f(v, x)), x)
    return out


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["mlp", "cnn", "transformer", "portable_transformer", "chunked_transformer"]
)
@pytest.mark.parametrize("backend", ALL)
def test_round_trip_per_target(exported, name, backend):
    path, reference, x = exported[name]
    manifest = _manifest(path)
    if backend not in manifest["targets"]:
        # Only a converter limitation may skip a target, and then it says which op.
        why = manifest["skipped_targets"][backend]
        assert name in ("transformer", "chunked_transformer") and backend == "onnx", why
        assert "cannot" in why and ("op" in why or "node" in why), why
        pytest.skip(f"{backend} cannot represent the {name}: {why}")
    parity = manifest["targets"][backend]["parity"]
    assert parity["max_abs_error"]["output"] < 1e-4
    assert parity["max_rel_error"]["output"] < 1e-4
    predictor = jaxmint_runtime.load(path, backend=backend)
    assert predictor.backend_name == backend
    for n in (1, 3, 4, 6):  # declared, padded, declared, beyond the largest (chunked for IREE)
        np.testing.assert_allclose(predictor(x[:n]), reference(x[:n]), rtol=1e-4, atol=1e-5)


def test_each_target_owns_its_files_and_hashes(exported):
    path, _, _ = exported["mlp"]
    manifest = _manifest(path)
    assert manifest["format_version"] == 2 and list(manifest["targets"]) == list(ALL)
    onnx_target = manifest["targets"]["onnx"]
    assert onnx_target["opset"] == targets_module.DEFAULT_ONNX_OPSET
    assert onnx_target["files"] == ["onnx/model.onnx", "onnx/model.onnx.data"]
    iree = manifest["targets"]["iree"]
    assert {(m["batch_size"], m["hal_target"]) for m in iree["modules"]} == {
        (1, "llvm-cpu"),
        (4, "llvm-cpu"),
    }
    for f in [*onnx_target["files"], *(m["file"] for m in iree["modules"])]:
        assert f in manifest["files"] and len(manifest["files"][f]["sha256"]) == 64

    import onnx

    graph = onnx.load(str(path / "onnx/model.onnx"), load_external_data=False).graph
    (inp,) = graph.input
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"  # symbolic batch kept
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)


def test_onnx_conversion_imports_only_the_converter_plugins_an_export_needs(exported):
    """jax2onnx's equinox plugins (their import builds example models) and examples are
    left out; its jax plugins convert every model above."""
    loaded = [m for m in sys.modules if m.startswith("jax2onnx.plugins.")]
    assert any(m.startswith("jax2onnx.plugins.jax.") for m in loaded)
    skipped = ("jax2onnx.plugins.equinox", "jax2onnx.plugins.examples")
    assert not [m for m in loaded if m.startswith(skipped)]


def test_a_modified_target_file_is_refused(exported, tmp_path):
    import shutil

    path, _, _ = exported["mlp"]
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    with open(copy / "onnx/model.onnx.data", "r+b") as f:
        f.write(b"\x00\x00\x00\x00")
    with pytest.raises(ArtifactError, match=r"model.onnx.data: sha256 does not match"):
        jaxmint_runtime.load(copy, backend="onnx")


def test_auto_picks_by_documented_order(exported, monkeypatch):
    path, _, _ = exported["mlp"]
    assert backends.AUTO_ORDER == ("xla", "onnx", "iree")
    assert jaxmint_runtime.load(path, warmup=False).backend_name == "xla"
    monkeypatch.setenv("JAXMINT_BACKEND", "iree,onnx")
    assert jaxmint_runtime.load(path, warmup=False).backend_name == "iree"
    monkeypatch.setenv("JAXMINT_BACKEND", "tensorrt")
    with pytest.raises(ArtifactError, match=r"JAXMINT_BACKEND names unknown backends"):
        jaxmint_runtime.load(path)
    monkeypatch.delenv("JAXMINT_BACKEND")
    _hide(monkeypatch, "jax")  # as in an environment without jaxmint-runtime[xla]
    assert jaxmint_runtime.load(path, warmup=False).backend_name == "onnx"


def test_missing_backend_and_missing_target_messages(exported, monkeypatch):
    path, _, _ = exported["mlp"]
    with pytest.raises(ArtifactError, match=r"unknown backend 'tflite'"):
        jaxmint_runtime.load(path, backend="tflite")
    _hide(monkeypatch, "onnxruntime")
    with pytest.raises(backends.BackendUnavailable, match=r"pip install 'jaxmint-runtime\[onnx\]'"):
        jaxmint_runtime.load(path, backend="onnx")


def test_missing_export_extra_is_named_before_anything_is_written(tmp_path, monkeypatch):
    model, x = _models()["mlp"]
    x = x.astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    _hide(monkeypatch, "jax2onnx")
    with pytest.raises(ExportError, match=r"target 'onnx' needs \['jax2onnx'\].*jaxmint\[onnx\]"):
        export_model(model, variables, x, tmp_path / "a", name="m", targets="xla,onnx")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match=r"unknown export targets \['tvm'\]"):
        export_model(model, variables, x, tmp_path / "a", name="m", targets=["xla", "tvm"])


class _Whiten(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, _ = jnp.linalg.qr(x.reshape(x.shape[0], 8, 8))  # batched QR: LAPACK on CPU
        return nn.Dense(10, name="head")(q.reshape(x.shape[0], -1))


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return _Whiten(name="whiten")(nn.Dense(64, name="proj")(x))


@pytest.mark.slow
def test_unsupported_op_skips_only_that_target_and_names_op_and_layer(tmp_path):
    model = jaxmint.models.from_linen(_Net())
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    path = export_model(
        model, variables, x, tmp_path / "qr", name="qr", targets=ALL, batch_sizes=(4,),
        precompile=False, iree_hal_targets=["llvm-cpu"],
    )  # fmt: skip
    manifest = _manifest(path)
    assert list(manifest["targets"]) == ["xla"]
    skipped = manifest["skipped_targets"]
    assert "op 'qr'" in skipped["onnx"] and "'_Net/whiten'" in skipped["onnx"]
    assert "lapack" in skipped["iree"] and "_Net/whiten" in skipped["iree"]
    assert not (path / "onnx").exists() and not (path / "iree").exists()
    assert jaxmint_runtime.load(path)(x).shape == (4, 10)


def _corrupt_onnx(monkeypatch):
    """The converter returns a model whose first weight is off by 0.5: parity must fail."""
    real = targets_module.convert_onnx

    def convert(job, spec, opset):
        import onnx.numpy_helper as nh

        model = real(job, spec, opset)
        init = next(t for t in model.graph.initializer if len(t.dims) == 2)
        init.CopyFrom(nh.from_array(nh.to_array(init) + 0.5, init.name))
        return model

    monkeypatch.setattr(targets_module, "convert_onnx", convert)


def test_parity_failure_drops_the_target_and_shows_the_diff(tmp_path, monkeypatch):
    model, x = _models()["mlp"]
    x = x.astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    _corrupt_onnx(monkeypatch)
    path = export_model(
        model, variables, x, tmp_path / "a", name="m", targets="xla,onnx", precompile=False
    )
    manifest = _manifest(path)
    assert list(manifest["targets"]) == ["xla"]
    why = manifest["skipped_targets"]["onnx"]
    assert "parity check failed for output 'output'" in why and "max abs difference" in why
    assert not (path / "onnx").exists()
    assert not any(f.startswith("onnx/") for f in manifest["files"])
    with pytest.raises(ArtifactError, match=r"has no 'onnx' target.*--target onnx"):
        jaxmint_runtime.load(path, backend="onnx")
    # Every requested target failing writes nothing, and keeps what was there.
    (tmp_path / "b").mkdir()
    (tmp_path / "b/keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"no target could be exported; nothing was written"):
        export_model(model, variables, x, tmp_path / "b", name="m", targets="onnx", force=True)
    assert (tmp_path / "b/keep.txt").read_text() == "mine"
    # Replacing an artifact with one that lost a requested target is refused, too.
    before = (path / "manifest.json").read_text()
    with pytest.raises(ExportError, match=r"(?s)was kept.*--target xla"):
        export_model(model, variables, x, path, name="m", targets="xla,onnx", force=True)
    assert (path / "manifest.json").read_text() == before


def test_iree_refuses_modules_built_for_missing_cpu_features(tmp_path):
    target = {"cpu": "x86-64-v3", "cpu_flags": targets_module.cpu_flags_required("x86-64-v3")}
    with pytest.raises(ArtifactError, match=r"lacks them.*--iree-cpu generic"):
        _iree.check_cpu(target, tmp_path, flags={"sse2", "avx"})
    _iree.check_cpu(target, tmp_path, flags={*target["cpu_flags"], "sse2"})
    _iree.check_cpu({"cpu": "generic", "cpu_flags": []}, tmp_path, flags=set())
    assert backends.host_cpu_flags("processor: 0\nflags\t\t: fpu avx2 fma\n") == {
        "fpu",
        "avx2",
        "fma",
    }


def test_inspect_reports_every_target(exported):
    report = jaxmint_runtime.inspect_artifact(exported["mlp"][0], analyze=False)
    assert set(report["targets"]) == set(ALL)
    assert report["targets"]["xla"]["days_left"] > 100
    assert report["targets"]["onnx"]["opset"] == targets_module.DEFAULT_ONNX_OPSET
    assert {m["batch_size"] for m in report["targets"]["iree"]["modules"]} == {1, 4}
    assert set(report["backends_installed"]) == set(ALL)


def _hide(monkeypatch, module: str) -> None:
    """Make ``module`` look uninstalled to the backend and target checks."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.slow
def test_cli_exports_several_targets_and_flags_a_skipped_one(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from jaxmint.cli import main
    from jaxmint.experiment import fit_experiment, load_module

    script = Path(__file__).resolve().parents[2] / "experiments/digits_mlp.py"
    module = load_module(script)
    config = module.Config(**{**module.SMOKE, "workdir": str(tmp_path / "run"), "progress": False})
    fit_experiment(module.build(config), config, script=script)
    base = ["export", str(tmp_path / "run"), "--batch-sizes", "1,2", "--no-precompile"]
    several = ["--target", "xla,onnx", "--target", "iree", "--iree-hal-targets", "llvm-cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), *several, "--iree-cpu", "generic"]) == 0
    text = capsys.readouterr().out
    for target in ALL:
        assert f"target {target}:" in text
    assert "opset 21" in text and "max rel error" in text and "cpu generic" in text
    assert main(["inspect", str(tmp_path / "a"), "--no-analysis"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    _corrupt_onnx(monkeypatch)
    assert main([*base, "--out", str(tmp_path / "b"), "--target", "xla,onnx"]) == 3
    captured = capsys.readouterr()
    assert "warning: target onnx was skipped: parity check failed" in captured.err
    assert "target xla:" in captured.out


def test_cli_default_opset_is_the_exporters():
    from jaxmint import cli

    assert cli.DEFAULT_ONNX_OPSET == targets_module.DEFAULT_ONNX_OPSET


def test_iree_compiles_vulkan_where_the_compiler_can_and_runs_it_only_on_request(
    tmp_path, monkeypatch
):
    import iree.compiler

    model, x = _models()["mlp"]
    x = x.astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    path = export_model(
        model, variables, x, tmp_path / "v", name="m", targets="iree", batch_sizes=(2,)
    )
    iree_target = _manifest(path)["targets"]["iree"]
    hal = {m["hal_target"] for m in iree_target["modules"]}
    vulkan = "vulkan-spirv" in iree.compiler.query_available_targets()
    assert hal == ({"llvm-cpu", "vulkan-spirv"} if vulkan else {"llvm-cpu"})
    assert iree_target["cpu"] == targets_module.default_iree_cpu()
    assert jaxmint_runtime.load(path).backend.driver == "local-sync"  # never Vulkan unasked
    monkeypatch.setenv("JAXMINT_IREE_DRIVER", "vulkan")
    try:
        predictor = jaxmint_runtime.load(path)
    except ArtifactError as e:  # no Vulkan device here: refused, with the reason
        assert "vulkan" in str(e)
    else:
        np.testing.assert_allclose(
            predictor(x[:2]), model.apply(variables, x[:2]), rtol=1e-4, atol=1e-5
        )
    monkeypatch.setenv("JAXMINT_IREE_DRIVER", "cuda-graph")
    with pytest.raises(ArtifactError, match=r"JAXMINT_IREE_DRIVER='cuda-graph'"):
        jaxmint_runtime.load(path)


def test_dict_outputs_keep_their_names_and_order_on_every_backend(tmp_path):
    def init(key, x):
        return {"params": {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)}}

    def apply(v, x, *, train=False, key=None):
        y = x @ v["params"]["w"]
        return {"scale": jnp.exp(y), "mean": y, "argmax": jnp.argmax(y, axis=-1)}

    model = jaxmint.Model(init, apply)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    variables = init(None, x)
    path = export_model(
        model, variables, x, tmp_path / "d", name="d", targets=ALL, batch_sizes=(2, 4),
        precompile=False, iree_hal_targets=["llvm-cpu"],
    )  # fmt: skip
    manifest = _manifest(path)
    assert [o["name"] for o in manifest["outputs"]] == ["argmax", "mean", "scale"]
    assert list(manifest["targets"]) == list(ALL), manifest["skipped_targets"]
    want = apply(variables, x)
    for backend in ALL:
        got = jaxmint_runtime.load(path, backend=backend)(x[:3])
        assert set(got) == {"argmax", "mean", "scale"}
        np.testing.assert_array_equal(got["argmax"], np.asarray(want["argmax"][:3]))
        np.testing.assert_allclose(got["mean"], want["mean"][:3], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["scale"], want["scale"][:3], rtol=1e-5, atol=1e-6)


def test_unused_weights_and_a_static_batch_model_export_to_iree_and_onnx(tmp_path):
    def init(key, x):
        return {"params": {"w": jnp.ones((64, 10)) / 64, "unused": jnp.ones((3,))}}

    def apply(v, x, *, train=False, key=None):
        rows = np.arange(x.shape[0])  # numpy needs a concrete batch: no symbolic lowering
        return x @ v["params"]["w"] + jnp.asarray(rows, jnp.float32)[:, None] * 0

    model = jaxmint.Model(init, apply)
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    variables = init(None, x)
    path = export_model(
        model, variables, x, tmp_path / "s", name="s", targets="iree", batch_sizes=(2, 4),
        iree_hal_targets=["llvm-cpu"],
    )  # fmt: skip
    manifest = _manifest(path)
    assert list(manifest["targets"]) == ["iree"], manifest["skipped_targets"]
    assert manifest["outputs"] == [{"name": "output", "dtype": "float32", "shape": ["batch", 10]}]
    np.testing.assert_allclose(
        jaxmint_runtime.load(path)(x[:3]), apply(variables, x[:3]), rtol=1e-5, atol=1e-6
    )


def test_onnx_only_artifact_carries_no_weights_file(exported, tmp_path):
    model, x = _models()["mlp"]
    x = x.astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    path = export_model(model, variables, x, tmp_path / "o", name="o", targets="onnx")
    manifest = _manifest(path)
    assert "weights" not in manifest and not (path / "weights.safetensors").exists()
    predictor = jaxmint_runtime.load(path)
    assert predictor.backend_name == "onnx"
    np.testing.assert_allclose(
        predictor(x), model.apply(variables, x, train=False), rtol=1e-4, atol=1e-5
    )


class _Engine:
    """A stand-in backend that records which module each call used."""

    name = "stub"

    def __init__(self, fixed, any_size, specialized):
        self.fixed, self.any_size, self.specialized = frozenset(fixed), any_size, specialized
        self.calls = []

    def call(self, key, arrays):
        self.calls.append((key, arrays["x"].shape[0]))
        return [arrays["x"] * 2]

    def call1(self, key, x):
        return self.call(key, {"x": x})[0]

    def warm(self, key, arrays):
        self.call(key, arrays)
        return "ready"


@pytest.mark.parametrize(
    ("engine", "n", "calls"),
    [
        (_Engine({1, 32}, False, True), 5, [(32, 32)]),  # IREE: the next size it has
        (_Engine({1, 32}, False, True), 40, [(32, 32), (32, 32)]),  # chunks, last padded
        (_Engine(set(), True, True), 5, [(None, 8)]),  # XLA symbolic: a declared size
        (_Engine(set(), True, True), 40, [(None, 40)]),  # compiled once for 40
        (_Engine(set(), True, False), 5, [(None, 5)]),  # ONNX: as it is
    ],
)
def test_predictor_plans_padding_and_chunking_per_backend(engine, n, calls, tmp_path):
    from jaxmint_runtime import Predictor

    manifest = {
        "name": "m",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 2]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", 2]}],
        "batch_sizes": [1, 8, 32],
    }
    predictor = Predictor(tmp_path, manifest, engine)
    x = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    np.testing.assert_array_equal(predictor(x), x * 2)
    assert engine.calls == calls


def test_engine_settings_are_arguments_of_load(exported, monkeypatch):
    path, reference, x = exported["mlp"]
    monkeypatch.setenv("JAXMINT_IREE_DRIVER", "vulkan")  # the argument wins over the variable
    predictor = jaxmint_runtime.load(path, backend="iree", iree_driver="local-task")
    assert predictor.backend.driver == "local-task"
    np.testing.assert_allclose(predictor(x[:3]), reference(x[:3]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ArtifactError, match=r"iree_driver='bogus': choose from"):
        jaxmint_runtime.load(path, backend="iree", iree_driver="bogus")
    with pytest.raises(ArtifactError, match=r"onnx_providers asks for \['NoSuchProvider'\]"):
        jaxmint_runtime.load(path, backend="onnx", onnx_providers=["NoSuchProvider"])
    monkeypatch.setenv("JAXMINT_ONNX_PROVIDERS", "NoSuchProvider")
    with pytest.raises(ArtifactError, match=r"\$JAXMINT_ONNX_PROVIDERS asks for"):
        jaxmint_runtime.load(path, backend="onnx")
