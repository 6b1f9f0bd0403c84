"""Hostile artifacts: every file confined, listed, bounded and verified before use.

Each test tampers with a copy of a genuine artifact, asserts the `ArtifactError`
and its wording, and then checks that the genuine artifact still loads and predicts
in the same process and compilation cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import zlib

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from security_helpers import manifest, write_manifest

import jaxmint_runtime
from jaxmint_runtime import ArtifactError
from jaxmint_runtime._format import read_safetensors


def _load(directory, **kw):
    return jaxmint_runtime.load(directory, **kw)


def _module_entry(m):
    return m["targets"]["xla"] if "targets" in m else m


# -- paths: confined to the artifact ---------------------------------------------------


def test_module_outside_the_artifact_is_refused(attack, tmp_path, still_works):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    m = manifest(attack)
    module = _module_entry(m)["modules"][0]["file"]
    shutil.copy(attack / module, elsewhere / "module.jaxexport")
    _module_entry(m)["modules"][0]["file"] = "../elsewhere/module.jaxexport"
    del m["files"][module]
    (attack / module).unlink()
    write_manifest(attack, m)
    with pytest.raises(ArtifactError, match=r"field 'targets/xla/modules/0/file'"):
        _load(attack)
    still_works()


@pytest.mark.parametrize(
    "path", ["/dev/zero", "/etc/passwd", "compiled/../../x", "./module.jaxexport", "a\\b"]
)
def test_absolute_and_escaping_module_paths_are_refused(attack, path, still_works):
    m = manifest(attack)
    _module_entry(m)["modules"][0]["file"] = path
    write_manifest(attack, m)
    with pytest.raises(ArtifactError, match=r"field 'targets/xla/modules/0/file'"):
        _load(attack)
    still_works()


def test_precompiled_entry_naming_an_absolute_path_is_refused(attack, still_works):
    m = manifest(attack)
    entries = _module_entry(m)["precompiled"]
    assert entries, "the genuine artifact has precompiled executables"
    entries[0]["files"][0] = "/etc/hostname"
    write_manifest(attack, m)
    with pytest.raises(ArtifactError, match=r"field 'targets/xla/precompiled/0/files/0'"):
        _load(attack)
    still_works()


def test_a_files_key_outside_reveals_nothing(attack, still_works):
    m = manifest(attack)
    m["files"]["/etc/shadow"] = {"bytes": 1, "sha256": "0" * 64}
    write_manifest(attack, m)
    with pytest.raises(ArtifactError) as e:
        _load(attack)
    assert "files" in str(e.value) and "bytes, the manifest says" not in str(e.value)
    still_works()


@pytest.mark.parametrize("name", ["weights\u0000.safetensors", "wéights.safetensors", ""])
def test_nul_unicode_and_empty_names_are_refused(attack, name, still_works):
    m = manifest(attack)
    m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    write_manifest(attack, m)
    with pytest.raises(ArtifactError, match="field 'files'"):
        _load(attack)
    still_works()


# -- links and file kinds ----------------------------------------------------------------


def test_symlinked_weights_are_refused_even_with_the_right_content(attack, tmp_path, still_works):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(attack / "weights.safetensors", outside)
    (attack / "weights.safetensors").unlink()
    (attack / "weights.safetensors").symlink_to(outside)
    with pytest.raises(ArtifactError, match="weights.safetensors: a symlink inside the artifact"):
        _load(attack)
    still_works()


def test_symlinked_compiled_folder_is_refused(attack, tmp_path, still_works):
    outside = tmp_path / "compiled-outside"
    shutil.move(attack / "compiled", outside)
    (attack / "compiled").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError, match="compiled: a symlink inside the artifact"):
        _load(attack)
    still_works()


def test_hard_links_are_refused(attack, tmp_path, still_works):
    os.link(attack / "weights.safetensors", tmp_path / "second-name")
    with pytest.raises(ArtifactError, match="a hard link"):
        _load(attack)
    still_works()


def test_a_directory_where_a_file_is_expected(attack, still_works):
    (attack / "weights.safetensors").unlink()
    (attack / "weights.safetensors").mkdir()
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        _load(attack)
    still_works()


def test_a_module_not_listed_in_files_is_refused(attack, still_works):
    m = manifest(attack)
    module = _module_entry(m)["modules"][0]["file"]
    del m["files"][module]
    (attack / module).rename(attack / "other.jaxexport")
    _module_entry(m)["modules"][0]["file"] = "other.jaxexport"
    write_manifest(attack, m)
    with pytest.raises(ArtifactError, match="not listed in the manifest's files"):
        _load(attack, verify=False)  # confinement holds without hashing too
    still_works()


def test_a_sparse_2_gib_weights_file_is_refused_before_reading(attack, still_works):
    with open(attack / "weights.safetensors", "r+b") as f:
        f.truncate(2 << 30)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: 2147483648 bytes, the manifest"):
        _load(attack)
    still_works()


def test_a_100_mb_manifest_is_refused_unread(attack, still_works):
    (attack / "manifest.json").write_bytes(b" " * (100 << 20))
    with pytest.raises(ArtifactError, match="more than the 16777216 a manifest may have"):
        _load(attack)
    still_works()


# -- fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [True, -1, 0, "2", 2.0, None])
def test_bad_format_versions_are_refused(attack, version, still_works):
    m = manifest(attack)
    m["format_version"] = version
    write_manifest(attack, m)
    with pytest.raises(ArtifactError, match="format_version"):
        _load(attack)
    still_works()


@pytest.mark.parametrize("expires", ["garbage", "2099-13-45", None, "delete"])
def test_bad_or_missing_expiry_is_refused(attack, expires, still_works):
    m = manifest(attack)
    if expires == "delete":
        del _module_entry(m)["expires"]
    else:
        _module_entry(m)["expires"] = expires
    write_manifest(attack, m)
    with pytest.raises(ArtifactError, match="expires"):
        _load(attack)
    still_works()


# -- safetensors headers -------------------------------------------------------------------


def _rewrite_header(directory, mutate):
    path = directory / "weights.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header = mutate(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    write_manifest(directory, manifest(directory), rehash=True)  # a consistent hostile file


def _first(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize(
    ("mutate", "wording"),
    [
        (lambda h: list(h.values()), "header must be a JSON object"),
        (lambda h: {**h, _first(h): {**h[_first(h)], "dtype": "F128"}}, "unknown dtype"),
        (
            lambda h: {
                **h,
                _first(h): {
                    **h[_first(h)],
                    "data_offsets": [float(x) for x in h[_first(h)]["data_offsets"]],
                },
            },
            "data_offsets must be two integers",
        ),
        (lambda h: {**h, _first(h): {**h[_first(h)], "shape": ["3"]}}, "shape must be a list"),
        (lambda h: {**h, _first(h): "x"}, "the entry must be an object"),
    ],
    ids=["list-header", "unknown-dtype", "float-offsets", "string-dim", "entry-not-object"],
)
def test_malformed_safetensors_headers(attack, mutate, wording, still_works):
    _rewrite_header(attack, mutate)
    with pytest.raises(ArtifactError, match=wording):
        _load(attack)
    still_works()


def test_overlapping_tensors_are_refused(attack, still_works):
    def overlap(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
        a, b = h[names[0]], h[names[1]]
        if (
            a["data_offsets"][1] - a["data_offsets"][0]
            == b["data_offsets"][1] - b["data_offsets"][0]
        ):
            b = {**b, "data_offsets": list(a["data_offsets"]), "shape": a["shape"]}
        else:  # make the second start inside the first, keeping its own length
            length = b["data_offsets"][1] - b["data_offsets"][0]
            start = a["data_offsets"][0]
            b = {**b, "data_offsets": [start, start + length]}
        return {**h, names[1]: b}

    _rewrite_header(attack, overlap)
    with pytest.raises(ArtifactError, match="overlap"):
        _load(attack)
    still_works()


# -- the shared compilation cache ------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "compressed"])
def test_a_poisoned_cache_entry_does_not_break_a_genuine_artifact(
    attack, genuine, sample, caplog, compress
):
    m = manifest(attack)
    entries = [f for e in _module_entry(m)["precompiled"] for f in e["files"]]
    garbage = b"\x00not an executable" * 64
    for rel in entries:  # same names as the genuine executables, garbage inside
        (attack / rel).write_bytes(zlib.compress(garbage) if compress else garbage)
    write_manifest(attack, m, rehash=True)
    hostile = _load(attack)  # its entries fill the shared cache; XLA compiles instead
    np.testing.assert_allclose(hostile(sample), genuine[1], rtol=1e-5, atol=1e-6)
    with caplog.at_level("WARNING", logger="jaxmint_runtime"):
        predictor = jaxmint_runtime.load(genuine[0])
    assert "set aside the compilation cache entry" in caplog.text
    assert set(predictor.executables.values()) == {"precompiled"}
    np.testing.assert_allclose(predictor(sample), genuine[1], rtol=1e-5, atol=1e-6)


def test_garbage_left_in_the_cache_is_replaced_by_the_verified_entry(genuine, caplog, sample):
    from jaxmint_runtime import _cache

    cache_dir = _cache.configure()
    m = manifest(genuine[0])
    rel = _module_entry(m)["precompiled"][0]["files"][0]
    (cache_dir / os.path.basename(rel)).write_bytes(b"garbage from elsewhere")
    with caplog.at_level("WARNING", logger="jaxmint_runtime"):
        predictor = jaxmint_runtime.load(genuine[0])
    assert os.path.basename(rel) in caplog.text and "differs" in caplog.text
    assert (cache_dir / os.path.basename(rel)).read_bytes() == (genuine[0] / rel).read_bytes()
    assert predictor(sample).shape == (4, 3)


def test_artifacts_of_one_program_take_turns_in_the_cache_quietly(
    genuine, sample, tiny_model, tmp_path, caplog
):
    """Two versions of one model (same program, other weights) ship executables under the
    same cache key whose bytes differ. Loading them in turn replaces the entry each time,
    without a warning or a copy set aside: the entry there is one XLA loaded for the other."""
    from jaxmint.export import export_model
    from jaxmint_runtime import _cache

    variables = tiny_model.init(jax.random.PRNGKey(1), sample)
    sibling = tmp_path / "sibling"
    export_model(tiny_model, variables, sample, sibling, name="tiny", batch_sizes=(1, 4))
    names = lambda a: {
        os.path.basename(f) for e in _module_entry(manifest(a))["precompiled"] for f in e["files"]
    }
    assert names(sibling) & names(genuine[0])  # the same cache keys
    aside = _cache.configure() / "set-aside"
    before = len(list(aside.iterdir())) if aside.is_dir() else 0
    with caplog.at_level("WARNING", logger="jaxmint_runtime"):
        for artifact in (genuine[0], sibling, genuine[0], sibling):
            predictor = jaxmint_runtime.load(artifact)
            assert set(predictor.executables.values()) == {"precompiled"}
    assert caplog.text == ""
    assert (len(list(aside.iterdir())) if aside.is_dir() else 0) == before
    np.testing.assert_allclose(
        jaxmint_runtime.load(genuine[0])(sample), genuine[1], rtol=1e-5, atol=1e-6
    )


# -- property-based: every mutation loads correctly or raises ArtifactError ----------------

_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


@hypothesis.settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(data=st.data())
def test_mutated_manifests_load_or_raise_artifact_error(genuine, tmp_path, sample, data):
    base = manifest(genuine[0])
    paths = [p for p in _paths(base) if p and p[0] != "files"]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(_VALUES)
    target = tmp_path / f"m{abs(hash((path, repr(value)))) % 10**9}"
    shutil.copytree(genuine[0], target)
    mutated = json.loads(json.dumps(base))
    _set(mutated, path, value)
    write_manifest(target, mutated)
    try:
        predictor = jaxmint_runtime.load(target, warmup=False, precompiled=False)
        predictor(sample)
    except ArtifactError:
        pass
    except jaxmint_runtime.InputError:
        pass  # a mutated signature that the genuine sample no longer fits: said clearly
    finally:
        shutil.rmtree(target)


@hypothesis.settings(max_examples=80, deadline=None, derandomize=True)
@hypothesis.given(header=st.one_of(_VALUES, st.dictionaries(st.text(max_size=8), _VALUES)))
def test_mutated_safetensors_headers_read_or_raise_artifact_error(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\x00" * 64)
    with contextlib.suppress(ArtifactError):
        read_safetensors(path)


def test_the_published_schema_is_the_one_the_loader_uses():
    from pathlib import Path

    from jaxmint_runtime._trust import schema

    page = (Path(__file__).parents[2] / "docs" / "artifact-format.md").read_text()
    published = page.split("### The manifest's JSON Schema", 1)[1].split("```json", 1)[1]
    assert json.loads(published.split("```", 1)[0]) == schema()


def _onnx_artifact(directory, location):
    """A one-MatMul ONNX-only artifact whose weight lives in external data at ``location``."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir()
    (directory / "onnx").mkdir()
    weight = numpy_helper.from_array(np.full((8, 3), 0.5, np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["output"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = directory / "onnx" / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="w.data", size_threshold=0
    )
    proto = onnx.load(str(path), load_external_data=False)
    for kv in proto.graph.initializer[0].external_data:
        if kv.key == "location":
            kv.value = location
    onnx.save_model(proto, str(path))
    files = ["onnx/model.onnx"]
    if location == "w.data":
        files.append("onnx/w.data")
    else:
        (directory / "onnx" / "w.data").rename(directory.parent / "w.data")
    write_manifest(
        directory,
        {
            "format": "jaxmint-artifact",
            "format_version": 2,
            "name": "onnx-only",
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}],
            "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", 3]}],
            "batch_sizes": [1],
            "targets": {"onnx": {"file": "onnx/model.onnx", "files": files, "opset": 17}},
        },
        rehash=True,
    )


@pytest.mark.parametrize("location", ["../w.data", "/etc/hostname"])
def test_onnx_external_data_outside_the_artifact_is_refused(tmp_path, location, sample):
    pytest.importorskip("onnxruntime")
    _onnx_artifact(tmp_path / "good", "w.data")
    good = _load(tmp_path / "good", backend="onnx")
    np.testing.assert_allclose(good(sample), sample @ np.full((8, 3), 0.5, np.float32), rtol=1e-5)
    _onnx_artifact(tmp_path / "bad", location)
    with pytest.raises(ArtifactError, match=r"onnx/model.onnx: ONNX Runtime cannot load it"):
        _load(tmp_path / "bad", backend="onnx")
