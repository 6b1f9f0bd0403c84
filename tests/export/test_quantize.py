"""Weight-only quantized artifacts: every scheme on every target, judged by eval accuracy."""

import json

import jax
import numpy as np
import optax
import pytest

import jaxmint
import jaxmint_runtime
from jaxmint.export import ExportError, export_model

TARGETS = ("xla", "onnx", "iree")


@pytest.fixture(scope="module")
def trained():
    train, test = jaxmint.data.digits()
    model = jaxmint.models.mlp((64,), 10)
    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        train,
        steps=150,
        batch_size=64,
        progress=False,
    )
    return model, {"params": result.params}, test


def accuracy(predictor, test) -> float:
    logits = predictor.run({"x": test["x"]})["output"]
    return 100.0 * float(np.mean(np.argmax(logits, -1) == test["y"]))


@pytest.mark.parametrize("scheme, ratio", [("bf16", 0.55), ("int8-weights", 0.35)])
def test_each_scheme_on_every_target_keeps_accuracy_and_shrinks(trained, tmp_path, scheme, ratio):
    model, variables, test = trained
    out = export_model(
        model,
        variables,
        test["x"][:8],
        tmp_path / scheme,
        name="d",
        targets=TARGETS,
        quantize=scheme,
        eval_data=test,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["scheme"] == scheme and q["weights_quantized"] == 2 and q["weights_kept"] == 2
    assert set(q["targets"]) == set(TARGETS) and manifest["skipped_targets"] == {}
    float_bytes = sum(np.asarray(w).nbytes for w in jax.tree.leaves(variables))
    assert q["float_weight_bytes"] == float_bytes

    def total(prefix):
        return sum(v["bytes"] for k, v in manifest["files"].items() if k.startswith(prefix))

    for prefix in ("weights.safetensors", "onnx/"):  # the weights file, the ONNX graph
        assert total(prefix) <= ratio * float_bytes + 1024, prefix
    logits = np.asarray(model.apply(variables, test["x"], train=False))
    reference = 100.0 * float(np.mean(np.argmax(logits, -1) == test["y"]))
    assert q["float_metric"] == pytest.approx(reference, abs=1e-6)
    for target in TARGETS:
        predictor = jaxmint_runtime.load(out, backend=target)  # the runtime takes it unchanged
        assert predictor.self_check()
        got = accuracy(predictor, test)
        assert got == pytest.approx(q["targets"][target]["metric"], abs=1e-9)
        assert reference - got <= 0.5


def test_a_target_that_loses_accuracy_is_refused(trained, tmp_path):
    model, variables, test = trained
    # A weight on pixel 0, which is 0 in every digit: the float model is unchanged, but it
    # sets every column's int8 scale so high that the real weights round to zero.
    kernel = np.array(variables["params"]["dense0"]["kernel"])
    kernel[0, :] = 1e4
    variables = {
        "params": {
            **variables["params"],
            "dense0": {**variables["params"]["dense0"], "kernel": kernel},
        }
    }
    assert float(np.abs(test["x"][:, 0]).max()) == 0.0
    with pytest.raises(ExportError, match="points of eval accuracy") as e:
        export_model(
            model,
            variables,
            test["x"][:8],
            tmp_path / "bad",
            name="d",
            targets=("xla", "onnx"),
            quantize="int8-weights",
            eval_data=test,
        )
    assert "--max-metric-drop" in str(e.value) and "nothing was written" in str(e.value)
    assert not (tmp_path / "bad").exists()


def test_a_quantized_export_needs_labelled_eval_data(trained, tmp_path):
    model, variables, test = trained
    for eval_data, match in [
        (None, "judged by its accuracy on eval data"),
        ({"x": test["x"]}, "judged by its accuracy on eval data"),
        ({"x": test["x"], "y": test["y"].astype(np.float32)}, "must be integers"),
    ]:
        with pytest.raises(ExportError, match=match):
            export_model(
                model,
                variables,
                test["x"][:8],
                tmp_path / "q",
                name="d",
                quantize="bf16",
                eval_data=eval_data,
            )
    with pytest.raises(ExportError, match="is not one of"):
        export_model(model, variables, test["x"][:8], tmp_path / "q", name="d", quantize="int4")
    assert not (tmp_path / "q").exists()


def test_static_int8_onnx_is_calibrated_judged_and_served_unchanged(trained, tmp_path):
    model, variables, test = trained
    train, _ = jaxmint.data.digits()
    out = export_model(
        model,
        variables,
        test["x"][:8],
        tmp_path / "int8",
        name="d",
        targets=("onnx",),
        quantize="int8",
        eval_data=test,
        calibration_data=train,
        calibration_source="train",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    calibration = q["calibration"]
    assert q["scheme"] == "int8" and calibration["examples"] == 256
    assert calibration["source"] == "train" and len(calibration["sha256"]) == 64
    assert manifest["check"]["source"] == "onnx"
    import onnx

    graph = onnx.load(str(out / "onnx/model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # activations are quantized too
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert {len(t.dims) for t in int8} >= {2}  # and the kernels are stored as int8
    float_bytes = sum(np.asarray(w).nbytes for w in jax.tree.leaves(variables))
    assert q["weight_bytes"] <= 0.35 * float_bytes
    parity = manifest["targets"]["onnx"]["parity"]
    assert 0 < parity["max_rel_error"]["output"] < 0.2  # recorded, judged by accuracy

    predictor = jaxmint_runtime.load(out, backend="onnx")
    assert predictor.self_check()  # against the int8 graph's own answers
    got = accuracy(predictor, test)
    assert got == pytest.approx(q["targets"]["onnx"]["metric"], abs=1e-9)
    assert q["float_metric"] - got <= 0.5


def test_static_int8_refuses_other_targets_and_bad_calibration(trained, tmp_path):
    model, variables, test = trained
    cases = [
        ({"targets": ("xla", "onnx"), "calibration_data": test}, "for the onnx target only"),
        ({"targets": ("onnx",)}, "give calibration_data"),
        ({"targets": ("onnx",), "calibration_data": {"image": test["x"]}}, "has no 'x'"),
        ({"targets": ("onnx",), "calibration_data": test["x"][:, :10]}, r"float32\[256, 10\]"),
        ({"targets": ("onnx",), "calibration_data": test["x"] * np.nan}, "NaN"),
    ]
    for options, match in cases:
        with pytest.raises(ExportError, match=match):
            export_model(
                model,
                variables,
                test["x"][:8],
                tmp_path / "q",
                name="d",
                quantize="int8",
                eval_data=test,
                **options,
            )
    assert not (tmp_path / "q").exists()


def test_a_language_model_is_judged_per_token_with_its_bits_per_byte(tmp_path):
    train, test = jaxmint.data.stdlib_chars(16, max_bytes=40_000)
    model = jaxmint.models.transformer(
        256,
        max_len=16,
        d_model=32,
        num_layers=1,
        num_heads=2,
        attention=jaxmint.models.portable_attention,
    )
    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(3e-3),
        train,
        steps=60,
        batch_size=16,
        progress=False,
    )
    variables = {"params": result.params}
    eval_data = {k: v[:64] for k, v in test.items()}
    out = export_model(
        model,
        variables,
        test["x"][:4],
        tmp_path / "lm",
        name="lm",
        targets=("xla", "onnx"),
        quantize="int8-weights",
        eval_data=eval_data,
    )
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    logits = np.asarray(model.apply(variables, eval_data["x"], train=False), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, eval_data["y"][..., None], -1)[..., 0]
    bits = float(np.mean(log_z - picked) / np.log(2))
    assert q["float_bits"] == pytest.approx(bits, rel=1e-4)
    assert q["eval_examples"] == 64  # sequences; accuracy and bits are per token
    for target in ("xla", "onnx"):
        assert q["targets"][target]["bits"] == pytest.approx(bits, rel=0.01)  # within 1%


@pytest.mark.parametrize(
    "scheme, targets", [("bf16", TARGETS), ("int8-weights", ("iree",)), ("int8", ("onnx",))]
)
def test_every_scheme_refuses_a_target_that_loses_accuracy(trained, tmp_path, scheme, targets):
    model, variables, test = trained
    # The same offset on every output column of the last layer moves every logit equally,
    # so the float model's argmax is unchanged; stored as bfloat16 or int8, the offset
    # (~1000) leaves no precision for the small differences that decide the class.
    kernel = np.array(variables["params"]["head"]["kernel"]) + 1000.0
    params = {**variables["params"], "head": {**variables["params"]["head"], "kernel": kernel}}
    planted = {"params": params}
    float_logits = np.asarray(model.apply(planted, test["x"], train=False))
    base_logits = np.asarray(model.apply(variables, test["x"], train=False))
    assert (float_logits.argmax(-1) == base_logits.argmax(-1)).mean() > 0.99
    extra = {"calibration_data": test} if scheme == "int8" else {}
    with pytest.raises(ExportError, match="points of eval accuracy") as e:
        export_model(
            model,
            planted,
            test["x"][:8],
            tmp_path / "bad",
            name="d",
            targets=targets,
            quantize=scheme,
            eval_data=test,
            **extra,
        )
    for target in targets:
        assert f"costs the {target} target" in str(e.value)
    assert not (tmp_path / "bad").exists()
