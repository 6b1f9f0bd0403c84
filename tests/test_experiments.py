"""Every shipped experiment: --help lists every field, --smoke runs the whole path."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmint.diagnose import diagnose_run
from jaxmint.experiment import load_module
from jaxmint.export import export_run
from jaxmint_runtime import inspect_artifact

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.py"))
COMMON = [
    "--workdir",
    "--steps",
    "--batch-size",
    "--seed",
    "--lr",
    "--eval-every",
    "--checkpoint-every",
    "--strategy",
]


def run(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def test_there_are_experiments():
    names = {p.stem for p in EXPERIMENTS}
    assert {"digits_mlp", "char_transformer"} <= names


@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.stem)
def test_help_lists_every_field(script):
    out = run(script, "--help")
    assert out.returncode == 0, out.stderr
    module = load_module(script)
    for f in dataclasses.fields(module.Config):
        assert "--" + f.name.replace("_", "-") in out.stdout
    for flag in COMMON:
        assert flag in out.stdout
    assert "--smoke" in out.stdout


@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.stem)
def test_smoke_trains_evaluates_and_resumes(script, tmp_path):
    workdir = tmp_path / "run"
    out = run(script, "--smoke", "--workdir", workdir, "--no-progress", "--diagnose-every", "5")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"run dir: {workdir.resolve()}" in out.stdout
    assert "eval/accuracy" in out.stdout
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in r for r in records)
    config = json.loads((workdir / "config.json").read_text())
    assert config["config"]["experiment"] == str(script.resolve())
    steps = config["config"]["steps"]
    assert records[-1]["step"] == steps
    # A healthy smoke run: the diagnosis raises no false alarm.
    report = diagnose_run(workdir, plots=False)
    assert report.flags == [], report.text
    # The same command again resumes at the end: nothing retrained, same outcome.
    again = run(script, "--smoke", "--workdir", workdir, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[-1] == out.stdout.splitlines()[-1]
    assert "changed config fields" not in again.stderr  # the same config: no false alarm


@pytest.mark.slow
def test_digits_default_config_reaches_97_percent(tmp_path):
    module = load_module(REPO / "experiments/digits_mlp.py")
    config = dataclasses.replace(module.Config(), workdir=str(tmp_path / "run"), progress=False)
    from jaxmint.experiment import fit_experiment

    result = fit_experiment(module.build(config), config)
    assert result.final_eval["eval/accuracy"] >= 0.97


def test_char_transformer_trains_on_a_corpus_on_disk_and_exports(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "src" / "jaxmint" / "data", corpus)  # some text files of our own
    workdir = tmp_path / "run"
    script = REPO / "experiments/char_transformer.py"
    args = ["--smoke", "--data", corpus, "--data-workers", "1", "--workdir", workdir]
    # ... with its blocks as one scan and attention in chunks of 8 queries (of 32), which
    # train and export like the unrolled blocks and whole attention
    long = ["--scan-layers", "--num-layers", "2", "--attention-chunk", "8"]
    out = run(script, *args, "--no-progress", *long)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval/accuracy" in out.stdout
    saved = workdir / "checkpoints" / "12" / "data" / "process_0-of-1.json"
    assert saved.is_file()  # the Grain iterator's state, beside the train state
    result = export_run(workdir, tmp_path / "artifact")
    assert result.exists()
    # XLA counts a loop's body once: the report says its figures are lower bounds.
    analysis = inspect_artifact(result)["analysis"]
    assert all(a["loops_counted_once"] for a in analysis.values())
    missing = run(script, "--smoke", "--data", tmp_path / "nowhere", "--workdir", tmp_path / "x")
    assert missing.returncode == 1 and "error: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
