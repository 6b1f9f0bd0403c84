"""``jaxmint-serve --backend NAME``: the same artifact served by XLA, ONNX Runtime and IREE."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import binary_body, json_body, output_of, request, train_digits

BACKENDS = ("xla", "onnx", "iree")


@pytest.fixture(scope="module")
def multi_artifact(tmp_path_factory):
    """The digits MLP exported to every target, and the original function."""
    from jaxmint.export import export_model

    model, variables, test = train_digits()
    out = export_model(
        model,
        variables,
        test["x"][:16],
        tmp_path_factory.mktemp("serve") / "digits",
        name="digits",
        targets=BACKENDS,
        batch_sizes=(1, 8),
        iree_hal_targets=["llvm-cpu"],
    )
    return out, lambda x: np.asarray(model.apply(variables, x))


class _Serve:
    """A real ``jaxmint-serve`` process on 127.0.0.1, port chosen by the OS."""

    def __init__(self, artifact: Path, backend: str):
        script = Path(sys.executable).parent / "jaxmint-serve"
        self.proc = subprocess.Popen(
            [str(script), str(artifact), "--port", "0", "--backend", backend],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        line = self.proc.stdout.readline()
        if "listening on" not in line or time.monotonic() > deadline:
            self.proc.kill()
            raise AssertionError(f"jaxmint-serve did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_serves_json_binary_and_tritonclient(multi_artifact, backend):
    artifact, reference = multi_artifact
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    server = _Serve(artifact, backend)
    try:
        status, _, body = request(server.port, "GET", "/v2/models/digits")
        assert status == 200 and json.loads(body)["platform"] == f"jaxmint/{backend}"
        got = output_of(*request(server.port, "POST", "/v2/models/digits/infer", json_body(x)))
        np.testing.assert_allclose(got, reference(x), rtol=1e-4, atol=1e-5)
        body, headers = binary_body(x[:1])
        got = output_of(*request(server.port, "POST", "/v2/models/digits/infer", body, headers))
        np.testing.assert_allclose(got, reference(x[:1]), rtol=1e-4, atol=1e-5)

        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        tensor = httpclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("digits", [tensor])
        np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-4, atol=1e-5)
        client.close()
    finally:
        assert server.stop() == 0


def test_serve_refuses_a_backend_the_artifact_lacks(tmp_path, artifact):
    script = Path(sys.executable).parent / "jaxmint-serve"
    out = subprocess.run(
        [str(script), str(artifact), "--port", "0", "--backend", "iree"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "has no 'iree' target" in out.stderr and "--target iree" in out.stderr


@pytest.mark.slow
def test_bench_all_backends_prints_one_table(multi_artifact, tmp_path, capsys):
    from jaxmint_runtime.bench import main

    artifact, _ = multi_artifact
    out = tmp_path / "all.json"
    args = [str(artifact), "--all-backends", "--batch-sizes", "1,8", "--seconds", "0.05"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cold start s" in text and "peak RSS MiB" in text and "install MiB" in text
    report = json.loads(out.read_text())
    assert [r["backend"] for r in report["backends"]] == list(BACKENDS)
    for r in report["backends"]:
        assert [lat["batch_size"] for lat in r["latency"]] == [1, 8]
        assert r["install_bytes"] > 10 * 2**20  # numpy alone is bigger than that
        assert r["cold_start"]["backend"] == r["backend"]
        assert r["cold_start"]["peak_rss_bytes"] > 10 * 2**20
    # The lean backends do not pay for jax in their cold-start process.
    rss = {r["backend"]: r["cold_start"]["peak_rss_bytes"] for r in report["backends"]}
    assert rss["onnx"] < rss["xla"] and rss["iree"] < rss["xla"]


def test_onnx_threads_sleep_between_ops_and_their_count_is_set(multi_artifact, monkeypatch):
    import jaxmint_runtime
    from jaxmint_runtime import ArtifactError

    artifact, _ = multi_artifact
    monkeypatch.setenv("JAXMINT_ONNX_THREADS", "2")
    predictor = jaxmint_runtime.load(artifact, backend="onnx")
    options = predictor.backend.session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv("JAXMINT_ONNX_THREADS", "zero")
    with pytest.raises(ArtifactError, match="JAXMINT_ONNX_THREADS must be a positive integer"):
        jaxmint_runtime.load(artifact, backend="onnx")
