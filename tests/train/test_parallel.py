"""Strategies agree with a single device; multi-process runs; errors; restore elsewhere.

Each case runs in a subprocess with its own number of fake CPU devices.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

HERE = Path(__file__).parent
STRATEGIES = "single,data,fsdp,pmap"


def run(args, devices=8, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out = subprocess.run(
        [sys.executable, str(HERE / "parallel_check.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def assert_same_curve(a, b, rtol=2e-5):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=rtol)
    np.testing.assert_allclose(a["params"], b["params"], rtol=rtol)
    np.testing.assert_allclose(a["stats"], b["stats"], rtol=rtol)


MESHES = ["mesh:data=2/fsdp=4", "mesh:fsdp=-1/data=1"]  # and data, fsdp: (8, 1) and (1, 8)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mlp", "cnn", "accum"])
def test_every_strategy_matches_single_device(case):
    meshes = MESHES if case == "mlp" else []
    results = run([case, ",".join([STRATEGIES, *meshes])])
    assert results["data"]["devices"] == 8
    for strategy in ("data", "fsdp", "pmap", *meshes):
        assert_same_curve(results[strategy], results["single"])
    if case == "cnn":
        assert results["single"]["stats"] and all(s > 0 for s in results["single"]["stats"])
    if case == "mlp":
        assert '[null, "fsdp"]' in results["fsdp"]["sharded"]  # kernels split by column
        assert results["data"]["sharded"] == ["[]"]
        # The meshes shard what they say: fsdp=4 splits kernels, fsdp=8 most bytes 8 ways.
        assert '[null, "fsdp"]' in results["mesh:data=2/fsdp=4"]["sharded"]
        whole = results["mesh:fsdp=-1/data=1"]
        assert whole["param_bytes_per_device"] < 0.2 * whole["param_bytes"]
        assert results["data"]["param_bytes_per_device"] == whole["param_bytes"]


@pytest.mark.slow
def test_tensor_parallel_transformer_matches_one_device_and_splits_by_the_rules():
    sizes = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]  # data, fsdp, tensor
    meshes = [f"mesh:data={d}/fsdp={f}/tensor={t}" for d, f, t in sizes]
    sequence = ["mesh:sequence=8", "mesh:data=2/sequence=2/tensor=2"]  # positions split
    results = run(["transformer", ",".join(["single", *meshes, *sequence])])
    for mesh in meshes + sequence:
        assert_same_curve(results[mesh], results["single"])
    # (1, 1, 8): heads, the MLP's hidden axis and the vocabulary split 8 ways.
    tensor = results[meshes[-1]]
    assert tensor["param_bytes_per_device"] < 0.2 * tensor["param_bytes"]
    assert '[null, "tensor"]' in tensor["sharded"] and '["tensor", null]' in tensor["sharded"]
    assert '["fsdp", null, "tensor", null]' in results[meshes[2]]["sharded"]  # qkv, Megatron
    assert results[meshes[0]]["sharded"] == ["[]"]  # data=8: every parameter whole


@pytest.mark.slow
def test_a_scanned_transformer_matches_one_device_with_its_layers_axis_whole():
    """Scanned, with chunked attention and the chunked cross-entropy."""
    mesh = "mesh:data=2/fsdp=2/tensor=2"
    results = run(["transformer-scan", f"single,{mesh}"])
    assert_same_curve(results[mesh], results["single"])
    # qkv's stacked kernel: (layers, embed, 3, heads, kv), the layers never split.
    assert '[null, "fsdp", null, "tensor", null]' in results[mesh]["sharded"]
    split = results[mesh]
    assert split["param_bytes_per_device"] < 0.3 * split["param_bytes"]  # fsdp x tensor


def test_the_transformers_activations_are_laid_out_by_the_rules():
    meshes = ["tensor=8", "data=2,fsdp=2,tensor=2", "data=2,sequence=4", "sequence=2,tensor=4"]
    found = run(["activations", ";".join(meshes)])
    assert found["outside"] == {}  # one device, export, eager: constrain is a no-op
    tensor, mixed = found["tensor=8"], found["data=2,fsdp=2,tensor=2"]
    # batch 8, length 16, width 32, 8 heads of 4, MLP hidden 128, vocabulary 256
    assert tensor["8x16x128"] == [[], [], ["tensor"]]  # the MLP's hidden axis, Megatron
    assert tensor["8x16x8x4"] == [[], [], ["tensor"], []]  # attention by heads
    assert tensor["8x16x256"] == [[], [], ["tensor"]]  # logits by vocabulary
    # the residual stream split by position between the tensor-parallel layers (Megatron's
    # sequence parallelism), whole along the width
    assert tensor["8x16x32"] == [[], ["tensor"], []]
    # batch takes data and fsdp, so embed (fsdp for the weights) stays whole here
    assert mixed["8x16x32"] == [["data", "fsdp"], ["tensor"], []]
    assert mixed["8x16x128"] == [["data", "fsdp"], [], ["tensor"]]
    # sequence parallelism: every activation split by position too
    sequence = found["data=2,sequence=4"]
    assert sequence["8x16x32"] == [["data"], ["sequence"], []]
    both = found["sequence=2,tensor=4"]  # the residual stream's positions over both axes
    assert both["8x16x32"] == [[], ["sequence", "tensor"], []]
    assert both["8x16x8x4"] == [[], ["sequence"], ["tensor"], []]
    assert sequence["8x16x8x4"] == [["data"], ["sequence"], [], []]


def test_constrain_names_each_dimension():
    import jax
    import jax.numpy as jnp

    from jaxmint.models import activation_layout, constrain
    from jaxmint.train import DEFAULT_RULES

    x = jnp.zeros((4, 3))
    assert constrain(x, "batch", "embed") is x  # no layout: unchanged
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with (
        activation_layout(mesh, DEFAULT_RULES),
        pytest.raises(ValueError, match=r"2 axis names .* shape \(4, 3, 1\)"),
    ):
        constrain(x[..., None], "batch", "embed")


@pytest.mark.slow
def test_a_users_annotated_flax_module_is_split_by_the_rules_and_rules_can_change():
    sizes = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]  # data, fsdp, tensor; and tensor=8
    meshes = [f"mesh:data={d}/fsdp={f}/tensor={t}" for d, f, t in sizes] + ["mesh:tensor=8"]
    results = run(["annotated", ",".join(["single", *meshes])])
    for mesh in meshes:
        assert_same_curve(results[mesh], results["single"])
    tensor = results["mesh:tensor=8"]
    assert set(tensor["sharded"]) == {"[]", '[null, "tensor"]', '["tensor", null]'}
    assert tensor["param_bytes_per_device"] < 0.3 * tensor["param_bytes"]
    # rules={"mlp": None, ...}: the hidden axis stays whole; only the 16-wide vocab axis splits.
    whole = run(["annotated-mlp-whole", "mesh:tensor=8"])["mesh:tensor=8"]
    assert set(whole["sharded"]) == {"[]", '[null, "tensor"]'}
    assert whole["param_bytes_per_device"] > 2 * tensor["param_bytes_per_device"]


@pytest.mark.slow
def test_a_users_nnx_module_with_partitioning_is_split_by_the_same_rules():
    """nnx.with_partitioning names are logical axes too; the module is built outside a
    mesh (flax >= 0.12 would otherwise want one at creation)."""
    meshes = ["mesh:data=2/fsdp=2/tensor=2", "mesh:tensor=8"]
    results = run(["annotated-nnx", ",".join(["single", *meshes])])
    for mesh in meshes:
        assert_same_curve(results[mesh], results["single"])
    tensor = results["mesh:tensor=8"]
    assert set(tensor["sharded"]) == {"[]", '[null, "tensor"]', '["tensor", null]'}
    assert tensor["param_bytes_per_device"] < 0.3 * tensor["param_bytes"]
    assert '["fsdp", "tensor"]' in results[meshes[0]]["sharded"]  # up: embed x mlp


@pytest.mark.slow
def test_a_plain_pytree_model_named_by_path_patterns_trains_split_on_a_mesh():
    results = run(["pathnamed", "single,mesh:tensor=8"])
    assert_same_curve(results["mesh:tensor=8"], results["single"])
    tensor = results["mesh:tensor=8"]
    assert set(tensor["sharded"]) == {'[null, "tensor"]', '["tensor", null]'}
    assert tensor["param_bytes_per_device"] < 0.2 * tensor["param_bytes"]


def test_logical_names_map_to_mesh_axes_by_the_rules():
    from jax.sharding import PartitionSpec as P

    from jaxmint.train._parallel import DEFAULT_RULES, logical_spec

    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    spec = lambda names, shape, rules=DEFAULT_RULES: logical_spec(names, shape, rules, sizes)
    assert spec(("embed", None, "heads", "kv"), (32, 3, 8, 4)) == P("fsdp", None, "tensor", None)
    assert spec(("embed", "mlp"), (32, 128), {"mlp": None}) == P()  # nothing split
    assert spec(("heads", "mlp"), (8, 128)) == P("tensor", None)  # a mesh axis splits once
    assert spec(("vocab", "embed"), (255, 32)) == P(None, "fsdp")  # 255 does not divide by 2
    assert spec(("batch", "length"), (8, 16)) == P(("data", "fsdp"), None)
    assert logical_spec(("mlp",), (128,), DEFAULT_RULES, {"tensor": 1}) == P()


def test_a_mesh_that_does_not_fit_names_the_devices_and_the_meshes_that_do():
    import jaxmint
    from jaxmint import losses
    from jaxmint.train import MeshError
    from jaxmint.train._parallel import mesh_shape

    train, _ = jaxmint.data.digits()
    model, loss = jaxmint.models.mlp((8,), 10), losses.softmax_cross_entropy()

    def fit(**settings):
        jaxmint.fit(model, loss, optax.sgd(0.1), train, steps=1, batch_size=8, **settings)

    with pytest.raises(MeshError, match=r"mesh data=2 does not fit the 1 device .*: data=1$"):
        fit(mesh={"data": 2})
    for mesh, message in [
        ("data=-1,expert=2", "unknown axis 'expert'; the axes are data, fsdp, sequence, tensor"),
        ("data=-1,fsdp=-1", "only one axis may be -1"),
        ("data:2", "'data:2' is not AXIS=SIZE"),
        ("data=0", "the size of 'data' must be a positive integer or -1"),
        ("data=1,data=1", "axis 'data' is given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            fit(mesh=mesh)
    with pytest.raises(ValueError, match="give mesh or strategy, not both"):
        fit(mesh="data=-1", strategy="data")
    # On 8 devices, the meshes that fit are listed.
    with pytest.raises(MeshError, match=r"data=1,fsdp=8; data=2,fsdp=4; data=4,fsdp=2; data=8"):
        mesh_shape({"data": 3, "fsdp": -1}, 8)
    assert mesh_shape({"fsdp": 2, "data": -1}, 8) == {
        "data": 4,
        "fsdp": 2,
        "sequence": 1,
        "tensor": 1,
    }


def test_batch_not_divisible_by_devices_fails_before_compiling():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    code = (
        "import jaxmint, optax; from jaxmint import losses\n"
        "train, _ = jaxmint.data.digits()\n"
        "jaxmint.fit(jaxmint.models.mlp((8,), 10), losses.softmax_cross_entropy(),"
        " optax.sgd(0.1), train, steps=1, batch_size=12, strategy='data', progress=False)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode != 0
    assert "batch_size=12" in out.stderr and "not divisible by 8" in out.stderr
    assert "[8, 16, 24" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir, devices=2, mesh="data=2,fsdp=2"):
    """multihost_worker.py in 2 processes of ``devices`` fake devices: process 0's RESULT."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    worker = [sys.executable, str(HERE / "multihost_worker.py"), str(port), "2"]
    procs = [
        subprocess.Popen(
            [*worker, str(i), str(workdir), str(devices), mesh],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    line = next(x for x in outs[0][0].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
    multi = two_processes(tmp_path / "run")
    single = run(["mlp", "data"], devices=4)["data"]
    np.testing.assert_allclose(multi["loss"], single["loss"], rtol=2e-5)
    np.testing.assert_allclose(multi["params"], single["params"], rtol=2e-5)
    # Written once: one metrics line per step, and the checkpoints of both saves.
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert {p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit()} == {
        "3",
        "6",
    }
    assert multi["eval"]["eval/accuracy"] > 0.1


@pytest.mark.slow
def test_a_checkpoint_moves_between_meshes_processes_and_to_one_device(tmp_path):
    """Written under (2, 2, 2); continued there bit-identically, and under (8, 1, 1), under
    2 processes of 4 devices, and on one device, each within float32's reordering."""
    mesh = "mesh:data=2/fsdp=2/tensor=2"
    first = tmp_path / "first"
    assert len(run(["mlp", mesh, first, 3])[mesh]["loss"]) == 3  # checkpointed at step 3
    straight = run(["mlp", mesh, "-", 6])[mesh]
    for target, devices in [(mesh, 8), ("mesh:data=8", 8), ("single", 1), ("processes", 4)]:
        workdir = tmp_path / target.replace(":", "_").replace("/", "_")
        shutil.copytree(first, workdir)
        _mark_logged_losses(workdir / "metrics.jsonl")
        if target == "processes":  # data across the processes, fsdp and tensor inside
            resumed = two_processes(workdir, devices, "data=2,fsdp=2,tensor=2")
        else:
            resumed = run(["mlp", target, workdir, 6], devices=devices)[target]
        # Steps 1-3 are read back from the run directory (marked), not trained again.
        assert resumed["loss"][:3] == [MARK + x for x in straight["loss"][:3]]
        assert len(resumed["loss"]) == 6
        if target == mesh:  # the same mesh continues bit-identically
            assert resumed["loss"][3:] == straight["loss"][3:]
            assert resumed["params"] == straight["params"]
        else:  # another layout sums in another order
            np.testing.assert_allclose(resumed["loss"][3:], straight["loss"][3:], rtol=2e-5)
            np.testing.assert_allclose(resumed["params"], straight["params"], rtol=2e-5)


MARK = 1000.0


def _mark_logged_losses(path):
    """Add MARK to each logged loss: a resumed run's history shows whether it read them."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "loss": MARK + r["loss"]}) + "\n" for r in records))


def test_show_sharding_plans_a_runs_parameter_layout_without_its_devices(tmp_path, capsys):
    from jaxmint.cli import main
    from jaxmint.experiment import fit_experiment, load_module

    script = HERE.parents[1] / "experiments/char_transformer.py"
    module = load_module(script)
    overrides = {"steps": 1, "eval_every": 1, "checkpoint_every": 1, "progress": False}
    config = module.Config(**{**module.SMOKE, **overrides, "workdir": str(tmp_path / "run")})
    fit_experiment(module.build(config), config, script=script)
    capsys.readouterr()
    assert main(["show", str(tmp_path / "run"), "--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=2,fsdp=2,tensor=2" in out and "bytes / device" in out
    assert "heads" in out and "tensor" in out  # attention heads split on the tensor axis
    assert main(["show", str(tmp_path / "run"), "--sharding"]) == 0  # the run's own: 1 device
    assert "replicated" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "run"), "--mesh", "data=-1,tensor=2"]) == 2
    assert "every size given" in capsys.readouterr().err


def test_the_sharding_plan_splits_what_the_rules_say():
    import jax

    import jaxmint
    from jaxmint.train._parallel import sharding_plan
    from jaxmint.train._setup import param_axes

    model = jaxmint.models.transformer(64, max_len=16, d_model=32, num_layers=1, num_heads=4)
    x = np.zeros((2, 16), np.int32)
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(model.init, key, x)["params"]
    names = param_axes(model, key, x)
    rows = {r["parameter"]: r for r in sharding_plan(params, names, {"tensor": 4})}
    annotated = [r for r in rows.values() if r["logical"] and "tensor" in str(r["spec"])]
    assert annotated  # heads, mlp and vocab axes go to tensor
    for r in annotated:
        assert r["bytes_per_device"] * 4 == r["bytes"]
    whole = sharding_plan(params, names, {"data": 8})  # data only: every device holds all
    assert all(r["bytes_per_device"] == r["bytes"] for r in whole)


def test_a_plain_pytree_model_is_named_by_path_patterns_and_split_by_the_rules():
    import jax

    import jaxmint
    from jaxmint.train import plan_sharding

    def init(key, x):
        k1, k2 = jax.random.split(key)
        return {
            "w_in": jax.random.normal(k1, (x.shape[-1], 128)),
            "b_in": np.zeros(128, np.float32),
            "w_out": jax.random.normal(k2, (128, 10)),
        }

    def apply(params, x, *, train=False, key=None):
        return jax.nn.relu(x @ params["w_in"] + params["b_in"]) @ params["w_out"]

    plain = jaxmint.Model(init, apply)
    named = jaxmint.models.axes_by_path(
        plain, [(r"\['w_in'\]", ("embed", "mlp")), (r"\['w_out'\]", ("mlp", "vocab"))]
    )
    x = np.zeros((4, 64), np.float32)
    _, rows = plan_sharding(named, x, "tensor=4")
    by_name = {r["parameter"]: r for r in rows}
    assert by_name["['w_in']"]["logical"] == ("embed", "mlp")
    assert by_name["['w_in']"]["bytes_per_device"] * 4 == by_name["['w_in']"]["bytes"]
    assert by_name["['b_in']"]["logical"] is None  # no pattern: not named
    _, rows = plan_sharding(plain, x, "tensor=4")  # without names nothing goes to tensor
    assert all(r["bytes_per_device"] == r["bytes"] for r in rows)
    for patterns, match in [
        ([(r"\['w_hidden'\]", ("embed", "mlp"))], r"matches no parameter \(they are: \['b_in'\]"),
        ([(r"w_in", ("embed",))], r"gives 1 names \('embed',\) to parameter \['w_in'\] of shape"),
        ([(r"w_in[", ("embed", "mlp"))], "is not a regex"),
    ]:
        with pytest.raises(ValueError, match=match):
            plan_sharding(jaxmint.models.axes_by_path(plain, patterns), x, "tensor=4")
