"""Export: round trips, batch handling, platforms, precompiled executables, safety."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmint
import jaxmint_runtime
from jaxmint.experiment import fit_experiment, load_module
from jaxmint.export import ExportError, export_model, export_run
from jaxmint_runtime import ArtifactError, InputError

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests/golden/digits_v1"


@pytest.fixture(scope="module")
def trained():
    train, test = jaxmint.data.digits()
    model = jaxmint.models.mlp((32,), 10)
    r = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        train,
        steps=50,
        batch_size=64,
        progress=False,
    )
    return model, {"params": r.params}, test


@pytest.fixture(scope="module")
def artifact(trained, tmp_path_factory):
    model, variables, test = trained
    out = tmp_path_factory.mktemp("art") / "digits"
    return export_model(model, variables, test["x"][:16], out, name="digits")


def reference(trained, x):
    model, variables, _ = trained
    return np.asarray(model.apply(variables, x))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["digits_mlp", "char_transformer"])
def test_every_shipped_experiment_round_trips(script, tmp_path):
    module = load_module(REPO / f"experiments/{script}.py")
    config = module.Config(**{**module.SMOKE, "workdir": str(tmp_path / "run"), "progress": False})
    config = dataclasses.replace(config, eval_every=config.steps)
    exp = module.build(config)
    result = fit_experiment(exp, config, script=REPO / f"experiments/{script}.py")
    out = export_run(tmp_path / "run", tmp_path / "art", batch_sizes=(1, 4))
    predictor = jaxmint_runtime.load(out)
    x = np.asarray(exp.eval[exp.input_key][:6])
    variables = {"params": result.params, **jax.device_get(result.state.model_state)}
    want = np.asarray(exp.model.apply(variables, x))
    np.testing.assert_allclose(predictor(x), want, rtol=1e-5, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experiment"]["name"] == script
    assert manifest["experiment"]["step"] == config.steps
    if script == "char_transformer":  # token ids: the vocabulary is recorded and enforced
        assert manifest["inputs"][0]["range"] == [0, 256]
        bad = x.copy()
        bad[2, 5] = 256
        for call in (predictor, predictor.run):  # the fast path and the checked one
            with pytest.raises(InputError, match=r"outside \[0, 256\).*index \(2, 5\)"):
                call(bad)


def test_symbolic_batch_serves_many_sizes(artifact, trained):
    predictor = jaxmint_runtime.load(artifact)
    _, _, test = trained
    for n in (1, 3, 8, 13, 32, 45):
        x = test["x"][:n]
        np.testing.assert_allclose(predictor(x), reference(trained, x), rtol=1e-5, atol=1e-6)
    assert predictor.signature["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": ["batch", 64]}
    ]


def test_fixed_batch_sizes_pad_and_chunk(trained, tmp_path):
    model, variables, test = trained
    out = export_model(
        model,
        variables,
        test["x"][:8],
        tmp_path / "fixed",
        name="digits",
        batch_sizes=(2, 8),
        fixed_batch=True,
        precompile=False,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["batch_size"] for m in manifest["targets"]["xla"]["modules"]] == [2, 8]
    predictor = jaxmint_runtime.load(out)
    assert not predictor.symbolic
    for n in (1, 2, 5, 8, 19):
        x = test["x"][:n]
        np.testing.assert_allclose(predictor(x), reference(trained, x), rtol=1e-5, atol=1e-6)


def test_multi_platform_export_loads_on_cpu(trained, tmp_path):
    model, variables, test = trained
    out = export_model(
        model,
        variables,
        test["x"][:4],
        tmp_path / "multi",
        name="digits",
        platforms=("cpu", "cuda", "tpu"),
        batch_sizes=(4,),
        precompile=False,
    )
    predictor = jaxmint_runtime.load(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["xla"]["platforms"] == ["cpu", "cuda", "tpu"]
    x = test["x"][:4]
    np.testing.assert_allclose(predictor(x), reference(trained, x), rtol=1e-5, atol=1e-6)


def test_precompiled_used_when_matching_and_skipped_otherwise(artifact, tmp_path, caplog):
    predictor = jaxmint_runtime.load(artifact, warmup=False)
    # In this process the cache may already be warm; the decision is what matters.
    manifest = json.loads((artifact / "manifest.json").read_text())
    (entry,) = manifest["targets"]["xla"]["precompiled"]
    assert entry["platform"] == "cpu" and entry["files"]
    assert all((artifact / f).is_file() for f in entry["files"])
    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    manifest["targets"]["xla"]["precompiled"][0]["jaxlib"] = "0.0.1"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="jaxmint_runtime"):
        predictor = jaxmint_runtime.load(other)
    assert "no precompiled executable" in caplog.text and "0.0.1" in caplog.text
    assert predictor(np.zeros((2, 64), np.float32)).shape == (2, 10)


def test_precompiled_executables_hit_the_cache_in_a_fresh_process(artifact, tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import jaxmint_runtime, sys; p = jaxmint_runtime.load(sys.argv[1]);"
        "print(sorted(set(p.warmup().values())))"
    )
    env = {**os.environ, "JAXMINT_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a fresh process: nothing compiled before
    out = subprocess.run(
        [sys.executable, "-c", code, str(artifact)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['precompiled']"


def test_source_paths_are_not_embedded(artifact):
    blob = (artifact / "module.jaxexport").read_bytes()
    for needle in (str(REPO).encode(), b"site-packages", b'.py"'):
        assert needle not in blob


def test_input_validation_names_the_problem(artifact):
    predictor = jaxmint_runtime.load(artifact, warmup=False)
    with pytest.raises(InputError, match=r"'x' has dtype float64, expected float32"):
        predictor(np.zeros((2, 64)))
    with pytest.raises(InputError, match=r"'x' has shape \(2, 63\), expected \(batch, 64\)"):
        predictor(np.zeros((2, 63), np.float32))
    with pytest.raises(InputError, match=r"missing \['x'\], unexpected \['image'\]"):
        predictor({"image": np.zeros((2, 64), np.float32)})
    assert np.isnan(predictor(np.full((2, 64), np.nan, np.float32))).all()  # allowed
    strict = jaxmint_runtime.load(artifact, warmup=False, check_finite=True)
    with pytest.raises(InputError, match="NaN"):
        strict(np.full((2, 64), np.nan, np.float32))
    with pytest.raises(InputError, match="at least one example"):
        predictor(np.zeros((0, 64), np.float32))


def _copy(artifact, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


def test_tampered_truncated_and_foreign_files_are_refused(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    weights = art / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights.safetensors: sha256 does not match"):
        jaxmint_runtime.load(art)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match=r"weights.safetensors: \d+ bytes, the manifest says"):
        jaxmint_runtime.load(art)
    shutil.rmtree(art)
    art = _copy(artifact, tmp_path)
    (art / "extra.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(ArtifactError, match=r"extra.pkl: not part of the artifact"):
        jaxmint_runtime.load(art)


def test_newer_format_and_expired_module_are_refused(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99 is newer"):
        jaxmint_runtime.load(art)
    manifest["targets"]["xla"]["expires"] = "2020-01-01"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ArtifactError,
        match=r"compatibility window ended on 2020-01-01.*"
        r"allow_expired",
    ):
        jaxmint_runtime.load(art)
    assert jaxmint_runtime.load(art, allow_expired=True, warmup=False).name == "digits"
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        jaxmint_runtime.load(tmp_path)


def test_golden_v1_artifact_keeps_loading():
    expected = json.loads((GOLDEN.parent / "digits_v1.expected.json").read_text())
    predictor = jaxmint_runtime.load(GOLDEN, allow_expired=True)
    x = np.asarray(expected["x"], np.float32)
    np.testing.assert_allclose(predictor(x), np.asarray(expected["output"]), rtol=1e-5, atol=1e-6)
    assert predictor.manifest["format_version"] == 1


def test_existing_artifact_needs_force_and_survives_failed_export(trained, artifact, tmp_path):
    model, variables, test = trained
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_model(model, variables, test["x"][:4], artifact, name="digits")
    traces = []

    def impure_apply(v, x, *, train=False, key=None):
        traces.append(1)  # each trace bakes in a different factor: not a pure function
        return model.apply(v, x) * float(len(traces))

    impure = jaxmint.Model(model.init, impure_apply)
    before = (artifact / "manifest.json").read_text()
    with pytest.raises(ExportError, match=r"parity check failed for output 'output'"):
        export_model(impure, variables, test["x"][:4], artifact, name="digits", force=True)
    assert (artifact / "manifest.json").read_text() == before  # untouched
    assert not list(artifact.parent.glob(".digits.tmp-*"))


def test_dict_outputs_and_bad_arguments(tmp_path):
    def init(key, x):
        return {"params": {"w": jnp.ones((3, 2))}}

    def apply(v, x, *, train=False, key=None):
        y = x @ v["params"]["w"]
        return {"mean": y, "scale": jnp.exp(y)}

    model = jaxmint.Model(init, apply)
    x = np.ones((4, 3), np.float32)
    out = export_model(model, init(None, x), x, tmp_path / "dict", name="two", precompile=False)
    predictor = jaxmint_runtime.load(out)
    got = predictor(x)
    assert set(got) == {"mean", "scale"}
    np.testing.assert_allclose(got["scale"], np.exp(x @ np.ones((3, 2))), rtol=1e-6)
    with pytest.raises(ExportError, match="unknown platforms"):
        export_model(model, init(None, x), x, tmp_path / "bad", name="two", platforms=("gpu",))


def test_export_run_needs_a_recorded_experiment(tmp_path, trained):
    with pytest.raises(ExportError, match="has no config.json"):
        export_run(tmp_path, tmp_path / "out")
    model, _, test = trained
    jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        {"x": test["x"], "y": test["y"]},
        steps=2,
        batch_size=8,
        progress=False,
        workdir=tmp_path / "run",
    )
    with pytest.raises(ExportError, match="records no experiment script"):
        export_run(tmp_path / "run", tmp_path / "out")


def test_cli_export_and_inspect(tmp_path, capsys):
    from jaxmint.cli import main

    module = load_module(REPO / "experiments/digits_mlp.py")
    config = module.Config(**{**module.SMOKE, "workdir": str(tmp_path / "run"), "progress": False})
    fit_experiment(module.build(config), config, script=REPO / "experiments/digits_mlp.py")
    assert (
        main(
            [
                "export",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "a"),
                "--batch-sizes",
                "1,2",
                "--step",
                str(config.steps),
            ]
        )
        == 0
    )
    assert f"exported digits_mlp (step {config.steps})" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "digits_mlp" in text and "GFLOPs" in text and "weights.safetensors" in text
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["analysis"]["1"]["flops"] > 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "a")]) == 2
    assert "--force" in capsys.readouterr().err
    # The experiment names its classes; --labels FILE overrides them.
    assert (tmp_path / "a/labels.txt").read_text().split() == [str(d) for d in range(10)]
    names = tmp_path / "names.txt"
    names.write_text("".join(f"digit {d}\n" for d in range(10)))
    base = ["export", str(tmp_path / "run"), "--batch-sizes", "1", "--no-precompile"]
    assert main([*base, "--out", str(tmp_path / "b"), "--labels", str(names)]) == 0
    assert jaxmint_runtime.load(tmp_path / "b").labels["output"][3] == "digit 3"
    names.write_text("a\nb\n")
    assert main([*base, "--out", str(tmp_path / "c"), "--labels", str(names)]) == 2
    err = capsys.readouterr().err
    assert "2 labels for output 'output' of shape ['batch', 10]" in err
    assert not (tmp_path / "c").exists()
    assert main([*base, "--out", str(tmp_path / "c"), "--labels", str(tmp_path / "no")]) == 2
    assert "--labels" in capsys.readouterr().err
    # Quantized, judged on the experiment's eval data; inspect shows the scheme and drop.
    assert main([*base, "--out", str(tmp_path / "q"), "--quantize", "int8-weights"]) == 0
    out = capsys.readouterr().out
    assert "quantization: int8-weights" in out and "eval accuracy float" in out
    assert main(["inspect", str(tmp_path / "q"), "--no-analysis"]) == 0
    assert "quantization: int8-weights" in capsys.readouterr().out
    q = [*base, "--out", str(tmp_path / "r"), "--quantize", "int8-weights"]
    assert main([*q, "--max-metric-drop", "-1"]) == 2
    assert "max_metric_drop must be >= 0" in capsys.readouterr().err
    # Static int8: ONNX only, calibrated on the run's training data.
    assert main([*base, "--out", str(tmp_path / "s"), "--quantize", "int8"]) == 2
    assert "for the onnx target only" in capsys.readouterr().err
    s = [*base, "--out", str(tmp_path / "s"), "--quantize", "int8", "--target", "onnx"]
    assert main(s) == 0
    assert "quantization: int8, calibrated on 256 train examples" in capsys.readouterr().out


def test_force_never_drops_a_target_in_silence(trained, artifact, tmp_path):
    model, variables, test = trained
    sample = test["x"][:4]
    out = tmp_path / "two"
    shutil.copytree(artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["targets"]["onnx"] = {}  # as if exported with --target xla,onnx
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = (out / "manifest.json").read_text()
    with pytest.raises(ExportError, match=r"targets onnx that this export would drop.*--replace"):
        export_model(model, variables, sample, out, name="d", targets="xla", force=True)
    assert (out / "manifest.json").read_text() == before  # untouched
    export_model(model, variables, sample, out, name="d", targets="xla", force=True, replace=True)
    assert set(json.loads((out / "manifest.json").read_text())["targets"]) == {"xla"}
