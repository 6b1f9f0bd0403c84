"""``compile_cache``: JAX's persistent compilation cache for the programs `fit` compiles."""

import json
import os
import subprocess
import sys

import jax
import optax
import pytest

import jaxmint
from jaxmint import losses

SCRIPT = """
import json, sys
import jax, optax, jaxmint
from jaxmint import losses

events = {}
jax.monitoring.register_event_listener(
    lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1)
)
train, test = jaxmint.data.digits()
result = jaxmint.fit(
    jaxmint.models.mlp((32,), num_outputs=10), losses.softmax_cross_entropy(),
    optax.adam(1e-3), train, steps=12, batch_size=64, eval_data=test, eval_every=12,
    progress=False, compile_cache=sys.argv[1],
)
print(json.dumps({
    "hits": events.get("/jax/compilation_cache/cache_hits", 0),
    "misses": events.get("/jax/compilation_cache/cache_misses", 0),
    "loss": float(result.final_eval["eval/loss"]),
}))
"""


def _fresh_process(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test's own cache, not the suite's
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_a_second_process_loads_the_programs_the_first_compiled(tmp_path):
    cache = tmp_path / "xla"
    first = _fresh_process(cache)
    second = _fresh_process(cache)
    # init and the train step (over 0.1 s to compile each) are kept, then loaded
    assert first["misses"] >= 2 and first["hits"] == 0, first
    assert second["hits"] == first["misses"] and second["misses"] == 0, second
    assert second["loss"] == first["loss"]  # the same executables, the same numbers
    kept = {name.split("-")[0] for name in os.listdir(cache)}
    assert {"jit_init", "jit_train_step"} <= kept


def _fit_toy(toy, **settings):
    model = jaxmint.models.mlp((8,), num_outputs=3)
    loss, optimizer = losses.softmax_cross_entropy(), optax.sgd(0.1)
    return jaxmint.fit(model, loss, optimizer, toy, steps=2, batch_size=16, **settings)


def test_another_cache_already_in_use_stays_with_a_warning(toy, tmp_path, caplog):
    in_use = jax.config.jax_compilation_cache_dir  # the suite's (tests/conftest.py)
    assert in_use
    with caplog.at_level("WARNING", logger="jaxmint"):
        _fit_toy(toy, progress=False, compile_cache=tmp_path / "mine")
    assert str(tmp_path / "mine") in caplog.text and in_use in caplog.text
    assert jax.config.jax_compilation_cache_dir == in_use
    assert not (tmp_path / "mine").exists()


def test_a_file_as_the_cache_folder_is_refused_before_training(toy, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(ValueError, match="notes.txt is a file"):
        _fit_toy(toy, progress=False, compile_cache=taken, workdir=tmp_path / "run")
    assert taken.read_text() == "mine" and not (tmp_path / "run").exists()


def test_a_file_as_the_cache_folder_is_a_usage_error_on_the_command_line(tmp_path, capsys):
    from jaxmint.config import parse
    from jaxmint.experiment import Common

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(SystemExit):
        parse(Common, ["--compile-cache", str(taken)])
    assert "notes.txt is a file: give a folder" in capsys.readouterr().err


def test_a_folder_that_cannot_be_made_is_warned_about_and_the_run_compiles(tmp_path, caplog):
    from jaxmint.train._compiled import use_persistent_cache

    (tmp_path / "file").write_text("")
    in_use = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # as in a process without one
    try:
        with caplog.at_level("WARNING", logger="jaxmint"):
            assert use_persistent_cache(tmp_path / "file" / "xla") is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", in_use)
    assert "file/xla is not used" in caplog.text
