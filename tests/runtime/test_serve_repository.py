"""A model repository: versions, policies, Triton's repository extension, reload under load."""

import gc
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import build_artifact, json_body, output_of, request

import jaxmint_runtime
from jaxmint_runtime._format import read_safetensors, write_safetensors
from jaxmint_runtime.serve import Server
from jaxmint_runtime.serve._cli import main as serve_main
from jaxmint_runtime.serve._repository import RepositoryError, VersionPolicy, scan


def add_version(repo, artifact, model: str, version: int, *, corrupt: str = ""):
    """Copy ``artifact`` in as ``repo/model/version``, appearing at once (a rename).

    ``corrupt="byte"`` flips a byte of the weights (the sha256 no longer matches);
    ``corrupt="weights"`` doubles every weight and lists the new file's hash, as a
    mixed-up weights file would be: only the check sample can tell.
    """
    staging = repo / f".staging-{model}-{version}"
    shutil.copytree(artifact, staging)
    weights = staging / "weights.safetensors"
    if corrupt == "byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif corrupt == "weights":
        doubled = {k: np.asarray(v) * 2 for k, v in read_safetensors(weights).items()}
        weights.unlink()
        write_safetensors(weights, doubled)
        manifest = json.loads((staging / "manifest.json").read_text())
        data = weights.read_bytes()
        manifest["files"]["weights.safetensors"] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        shutil.rmtree(staging / "compiled", ignore_errors=True)  # built from the old weights
        for entry in manifest["targets"]["xla"].get("precompiled", []):
            for f in entry["files"]:
                manifest["files"].pop(f, None)
        manifest["targets"]["xla"]["precompiled"] = []
        (staging / "manifest.json").write_text(json.dumps(manifest))
    (repo / model).mkdir(exist_ok=True)
    os.rename(staging, repo / model / str(version))


@pytest.fixture
def repo(tmp_path, artifact):
    root = tmp_path / "repo"
    root.mkdir()
    add_version(root, artifact, "digits", 1)
    add_version(root, artifact, "digits", 2)
    shutil.copytree(artifact, root / "plain")  # a model directory that is an artifact: version 1
    (root / "notes.txt").write_text("not a model")
    (root / "digits" / "latest").mkdir()  # not a version number: skipped
    return root


def get(port, path, headers=None):
    status, _, body = request(port, "GET", path, headers=headers)
    return status, json.loads(body) if body else None


def post(port, path, body=b"", headers=None):
    status, _, answer = request(port, "POST", path, body, headers=headers, timeout=60)
    return status, json.loads(answer) if answer else None


def test_scan_and_policies(repo):
    found = scan(repo)
    assert sorted(found) == ["digits", "plain"] and sorted(found["digits"]) == [1, 2]
    assert list(found["plain"]) == [1]
    assert VersionPolicy.parse("latest:2").select([3, 1, 2]) == [2, 3]
    assert VersionPolicy.parse("all").select([2, 1]) == [1, 2]
    assert VersionPolicy.parse("specific:1,3").select([1, 2]) == [1]
    for bad in ("latest:0", "newest", "specific:", "specific:a", "all:2"):
        with pytest.raises(RepositoryError, match="is not one of latest:N"):
            VersionPolicy.parse(bad)


def test_versions_are_served_by_policy_and_addressed_by_path(repo, predictor, inputs):
    x = inputs[:2]
    want = predictor.run({"x": x})["output"]
    with Server([repo], port=0, version_policy="all") as server:
        status, meta = get(server.port, "/v2/models/digits")
        assert status == 200 and meta["versions"] == ["1", "2"]
        assert get(server.port, "/v2/models/digits/versions/1")[1]["versions"] == ["1"]
        for path, version in [
            ("/v2/models/digits/infer", "2"),  # the newest by default
            ("/v2/models/digits/versions/1/infer", "1"),
            ("/v2/models/plain/infer", "1"),
        ]:
            status, headers, body = request(server.port, "POST", path, json_body(x))
            assert status == 200 and json.loads(body)["model_version"] == version
            np.testing.assert_allclose(output_of(status, headers, body), want, rtol=1e-6)
        status, answer = post(server.port, "/v2/models/digits/versions/7/infer", json_body(x))
        assert status == 404 and "serves versions ['1', '2']" in answer["error"]
    with Server([repo], port=0, version_policy="specific:1") as server:
        assert get(server.port, "/v2/models/digits")[1]["versions"] == ["1"]
    with Server([repo], port=0) as server:  # latest:1
        assert get(server.port, "/v2/models/digits")[1]["versions"] == ["2"]
        assert get(server.port, "/v2/models/digits/config")[1]["version_policy"] == "latest:1"


def test_repository_index_unload_and_load(repo, inputs):
    token = {"Authorization": "Bearer t0k"}
    with Server([repo], port=0, token="t0k") as server:
        assert post(server.port, "/v2/repository/index")[0] == 401  # the token guards it
        status, index = post(server.port, "/v2/repository/index", headers=token)
        assert status == 200
        assert {(e["name"], e["version"], e["state"]) for e in index} == {
            ("digits", "1", "UNAVAILABLE"),
            ("digits", "2", "READY"),
            ("plain", "1", "READY"),
        }
        (old,) = [e for e in index if e["version"] == "1" and e["name"] == "digits"]
        assert "version policy latest:1" in old["reason"]
        ready = post(server.port, "/v2/repository/index", b'{"ready": true}', token)[1]
        assert len(ready) == 2 and all(e["state"] == "READY" for e in ready)
        assert post(server.port, "/v2/repository/index", b"[1]", token)[0] == 400

        assert post(server.port, "/v2/repository/models/digits/unload", headers=token) == (200, {})
        status, answer = post(server.port, "/v2/models/digits/infer", json_body(inputs[:1]), token)
        assert status == 404 and "unknown model 'digits'" in answer["error"]
        index = post(server.port, "/v2/repository/index", headers=token)[1]
        assert {e["reason"] for e in index if e["name"] == "digits"} == {"unloaded on request"}
        assert post(server.port, "/v2/repository/models/digits/load", headers=token) == (200, {})
        status, _, body = request(
            server.port, "POST", "/v2/models/digits/infer", json_body(inputs[:1]), token
        )
        assert status == 200 and json.loads(body)["model_version"] == "2"
        status, answer = post(server.port, "/v2/repository/models/nope/load", headers=token)
        assert status == 400 and "no model 'nope'" in answer["error"]
        assert post(server.port, "/v2/repository/models/nope/unload", headers=token)[0] == 400
        assert get(server.port, "/v2/repository/index", token)[0] == 405


@pytest.mark.parametrize("batch_on", ["loop", "thread"])  # loop: auto's choice here
def test_a_reload_under_load_answers_every_request_once(
    repo, artifact, predictor, inputs, batch_on
):
    """16 clients send requests while version 3 appears and version 2 is retired: each
    request is answered once, by the version it was routed to, and none fails."""
    with Server([repo], port=0, poll_interval_s=0.1, max_delay_ms=5, batch_on=batch_on) as server:
        stop = threading.Event()
        answers: dict[int, list] = {}
        failures: list = []

        def client(c: int):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            mine = answers.setdefault(c, [])
            i = 0
            while not stop.is_set() and i < 2000:
                row = inputs[(c * 7 + i) % len(inputs)][None]
                rid = f"{c}-{i}"
                conn.request("POST", "/v2/models/digits/infer", json_body(row, rid))
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    failures.append((response.status, body[:200]))
                    break
                msg = json.loads(body)
                if msg["id"] != rid:
                    failures.append(("answered with another request's id", rid, msg["id"]))
                got = np.asarray(msg["outputs"][0]["data"], np.float32)
                want = predictor.run({"x": row})["output"][0]
                if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    failures.append(("wrong answer", rid))
                mine.append(msg["model_version"])
                i += 1
            conn.close()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        add_version(repo, artifact, "digits", 3)
        deadline = time.monotonic() + 60
        while get(server.port, "/v2/models/digits")[1]["versions"] != ["3"]:
            assert time.monotonic() < deadline, "version 3 never replaced version 2"
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not failures, failures[:5]
        versions = [v for mine in answers.values() for v in mine]
        assert set(versions) == {"2", "3"}
        for mine in answers.values():  # each client saw 2 until it saw 3, never back
            assert mine == sorted(mine, key=int)
        counted = server.metrics.requests("digits", 200, "2") + server.metrics.requests(
            "digits", 200, "3"
        )
        assert counted == len(versions)  # answered exactly once each


def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(repo, artifact, inputs, caplog):
    caplog.set_level(logging.WARNING, logger="jaxmint_runtime.serve")
    with Server([repo], port=0, poll_interval_s=0.1) as server:
        add_version(repo, artifact, "digits", 3, corrupt="byte")
        deadline = time.monotonic() + 30
        while "not loaded" not in caplog.text:
            assert time.monotonic() < deadline, "the broken version was never tried"
            time.sleep(0.05)
        assert "version 3" in caplog.text and "sha256 does not match" in caplog.text
        assert get(server.port, "/v2/models/digits")[1]["versions"] == ["2"]
        status, _, body = request(
            server.port, "POST", "/v2/models/digits/infer", json_body(inputs[:1])
        )
        assert status == 200 and json.loads(body)["model_version"] == "2"
        index = post(server.port, "/v2/repository/index")[1]
        (broken,) = [e for e in index if e["version"] == "3"]
        assert broken["state"] == "UNAVAILABLE" and "sha256" in broken["reason"]
        time.sleep(0.5)  # later polls do not retry it (or log again) until it changes
        assert caplog.text.count("not loaded") == 1


def test_a_version_rewritten_in_place_is_reloaded_and_a_bad_rewrite_is_not(
    repo, artifact, inputs, tmp_path, caplog
):
    from jaxmint.export._artifact import _move_into_place

    caplog.set_level(logging.INFO, logger="jaxmint_runtime.serve")
    other = build_artifact(tmp_path / "other", steps=60)  # the same model, trained longer
    row = inputs[:1]
    old = jaxmint_runtime.load(artifact).run({"x": row})["output"][0]
    new = jaxmint_runtime.load(other).run({"x": row})["output"][0]
    assert not np.allclose(old, new, atol=1e-3)

    def rewrite(corrupt: str = ""):  # as `jaxmint export --force` replaces an artifact
        add_version(tmp_path, other, "staged", 1, corrupt=corrupt)
        _move_into_place(tmp_path / "staged" / "1", repo / "digits" / "2")

    def answer():
        status, _, body = request(
            server.port, "POST", "/v2/models/digits/versions/2/infer", json_body(row)
        )
        assert status == 200, body[:300]  # version 2 never went missing meanwhile
        return np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)

    with Server([repo], port=0, poll_interval_s=0.05) as server:
        assert np.allclose(answer(), old, rtol=1e-5, atol=1e-6)
        rewrite()
        deadline = time.monotonic() + 30
        while not np.allclose(answer(), new, rtol=1e-5, atol=1e-6):
            assert time.monotonic() < deadline, "the rewritten version was never reloaded"
        assert "version 2 reloaded from" in caplog.text and "rewritten in place" in caplog.text
        assert get(server.port, "/v2/models/digits")[1]["versions"] == ["2"]
        rewrite(corrupt="byte")  # a broken rewrite: refused, the previous export serves
        deadline = time.monotonic() + 30
        while "not loaded" not in caplog.text:
            assert time.monotonic() < deadline, "the broken rewrite was never tried"
            assert np.allclose(answer(), new, rtol=1e-5, atol=1e-6)
        assert np.allclose(answer(), new, rtol=1e-5, atol=1e-6)
        index = post(server.port, "/v2/repository/index")[1]
        (entry,) = [e for e in index if e["name"] == "digits" and e["version"] == "2"]
        assert entry["state"] == "READY" and "the previous export serves" in entry["reason"]


def test_a_version_that_fails_its_check_sample_is_refused(repo, artifact, caplog):
    caplog.set_level(logging.WARNING, logger="jaxmint_runtime.serve")
    add_version(repo, artifact, "digits", 3, corrupt="weights")
    with Server([repo], port=0) as server:
        assert get(server.port, "/v2/models/digits")[1]["versions"] == ["2"]
        assert "check sample saved at export differs from jax's answer" in caplog.text
        index = post(server.port, "/v2/repository/index")[1]
        (broken,) = [e for e in index if e["version"] == "3"]
        assert "output 'output' on the check sample" in broken["reason"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_returns_after_unload(repo):
    with Server([repo], port=0) as server:
        rounds = []
        for _ in range(6):
            assert post(server.port, "/v2/repository/models/digits/unload")[0] == 200
            assert post(server.port, "/v2/repository/models/digits/load")[0] == 200
            rounds.append(rss_bytes())
        growth = rounds[-1] - rounds[1]
        assert growth < 48 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB over 4 reloads"


def test_a_serving_process_freezes_its_heap_and_unloading_still_returns_memory(repo):
    """``jaxmint-serve`` moves its loaded heap out of the garbage collector's full
    collections (no stall of every request while one walks jax and the models); an
    unloaded version's memory still goes back (that collection reaches frozen objects)."""
    script = Path(sys.executable).parent / "jaxmint-serve"
    proc = subprocess.Popen(
        [str(script), str(repo), "--port", "0", "--log-level", "INFO"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.rsplit(":", 1)[1])
        rounds = []
        for _ in range(6):
            assert post(port, "/v2/repository/models/digits/unload")[0] == 200
            assert post(port, "/v2/repository/models/digits/load")[0] == 200
            with open(f"/proc/{proc.pid}/statm") as f:
                rounds.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        growth = rounds[-1] - rounds[1]
        assert growth < 48 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB over 4 reloads"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    frozen = re.search(r"froze (\d+) objects", err)
    assert frozen and int(frozen.group(1)) > 10_000, err[-2000:]


def test_unloading_collects_cycles_that_were_frozen():
    """A version loaded in a frozen process is frozen too; unloading it must still free
    what its objects hold in reference cycles, which a plain collection skips."""
    from jaxmint_runtime.serve._server import _collect

    class Node:
        pass

    node = Node()
    node.itself = node
    alive = weakref.ref(node)
    gc.freeze()
    try:
        del node
        gc.collect()
        assert alive() is not None  # frozen: out of a plain collection's reach
        _collect()
        assert alive() is None
        assert gc.get_freeze_count() > 0  # and the rest stays frozen
    finally:
        gc.unfreeze()


def test_cli_serves_a_repository_and_refuses_a_bad_policy(repo, capsys):
    assert serve_main([str(repo), "--version-policy", "newest"]) == 2
    assert "is not one of latest:N" in capsys.readouterr().err
    assert serve_main([str(repo), "--poll-interval", "-1"]) == 2
    assert "--poll-interval" in capsys.readouterr().err
    empty = repo.parent / "empty"
    empty.mkdir()
    assert serve_main([str(empty)]) == 2
    assert "no model versions found" in capsys.readouterr().err
