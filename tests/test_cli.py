"""The jaxmint command."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

import jaxmint
from jaxmint.cli import main
from jaxmint.run import load_module


def test_info(capsys):
    assert main(["info"]) == 0
    assert "jax" in capsys.readouterr().out


def test_show_run_dir(tmp_path, toy, capsys):
    jaxmint.fit(
        jaxmint.models.mlp((8,), 3),
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        toy,
        steps=4,
        batch_size=32,
        workdir=tmp_path,
        eval_data=toy,
        progress=False,
    )
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "checkpoints at steps: [4]" in out and "eval/loss" in out
    assert main(["show", str(tmp_path / "nope")]) == 2


# -- a user's mistakes: exit code 2, one line naming the value, never a traceback ------

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_MISTAKES = [
    ("digits_mlp", ["--nonfinite", "maybe"], "nonfinite='maybe' is not one of ('raise', 'skip')"),
    ("digits_mlp", ["--strategy", "foo"], "strategy='foo' is not one of ('auto', 'single'"),
    ("digits_mlp", ["--mesh", "data=-1,expert=2"], "unknown axis 'expert'; the axes are data"),
    ("digits_mlp", ["--steps", "-5"], "steps must be a positive integer, got -5"),
    ("digits_mlp", ["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    ("digits_mlp", ["--compute-dtype", "float8"], "compute_dtype='float8' is not one of"),
    ("digits_mlp", ["--best-mode", "up"], "best_mode='up' is not one of ('min', 'max')"),
    ("digits_mlp", ["--dropout", "1.5"], "--dropout 1.5 is out of range: it must be between"),
    ("digits_mlp", ["--label-smoothing", "-0.1"], "--label-smoothing -0.1 is out of range"),
    ("digits_mlp", ["--lr", "-1"], "--lr -1.0 is out of range: it must be at least 0.0"),
    ("digits_mlp", ["--eval-every", "0"], "eval_every must be a positive integer or None"),
    ("digits_mlp", ["--grad-accum", "3"], "batch_size=128 is not divisible by grad_accum=3"),
    ("digits_mlp", ["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    ("digits_mlp", ["--bogus"], "unrecognized arguments: --bogus"),
    ("char_transformer", ["--d-model", "30", "--num-heads", "4"], "--d-model 30 is not a multiple"),
    ("char_transformer", ["--seq-len", "0"], "--seq-len 0 is out of range: it must be at least 1"),
    ("char_transformer", ["--num-heads", "0"], "--num-heads 0 is out of range"),
]


@pytest.mark.parametrize(("name", "argv", "says"), EXPERIMENT_MISTAKES)
def test_a_bad_experiment_flag_is_one_line_and_exit_code_2(name, argv, says, capsys, tmp_path):
    module = load_module(REPO / "experiments" / f"{name}.py")
    argv = [*argv, "--workdir", str(tmp_path / "never-written")]
    with pytest.raises(SystemExit) as e:
        jaxmint.experiment.main(module.build, module.Config, ["--smoke", *argv], smoke=module.SMOKE)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "never-written").exists()  # refused before anything ran


def test_cli_mistakes_are_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    script = REPO / "experiments" / "digits_mlp.py"
    module = load_module(script)
    monkeypatch.setitem(sys.modules, "__main__", module)  # the script the run dir records
    argv = ["--smoke", "--workdir", str(run), "--no-progress", "--steps", "4"]
    jaxmint.experiment.main(module.build, module.Config, argv, smoke=module.SMOKE)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare/config.json").write_text((run / "config.json").read_text())
    cases = [
        (
            ["export", str(run), "--out", str(tmp_path / "a"), "--step", "150"],
            "no checkpoint at step 150; available steps: [4]",
        ),
        (["export", str(tmp_path / "bare"), "--out", str(tmp_path / "b")], "has no checkpoints"),
        (
            ["export", str(run), "--out", str(tmp_path / "c"), "--bogus"],
            "jaxmint export: error: unrecognized arguments: --bogus",
        ),
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "d")], "nope"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["show", str(run), "--last", "0"], "argument --last: must be a positive integer, got 0"),
        (
            ["inspect-step", str(run), "--step", "3"],
            "no checkpoint at step 3; available steps: [4]",
        ),
        (["diagnose", str(tmp_path / "nope")], "not a run dir"),
        (
            ["lr-find", "experiments/digits_mlp.py", "--steps", "0"],
            "--steps: must be a positive integer",
        ),
        (
            ["lr-find", "experiments/digits_mlp.py", "--lr-max", "1e-9"],
            "--lr-min 1e-07 must be below --lr-max 1e-09",
        ),
        (["inspect", str(tmp_path / "nope")], "nope"),
    ]
    for argv, says in cases:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and says in err and "Traceback" not in err, (argv, err)


def test_a_bad_flag_from_a_fresh_interpreter_has_no_traceback():
    out = subprocess.run(
        [sys.executable, "experiments/digits_mlp.py", "--strategy", "foo"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr


def test_a_missing_optional_dependency_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    jaxmint.fit(
        jaxmint.models.mlp((8,), 3),
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        {"x": np.ones((32, 5), np.float32), "y": np.zeros(32, np.int32)},
        steps=3,
        batch_size=16,
        workdir=run,
        progress=False,
    )
    for name in ("matplotlib", "matplotlib.pyplot", "optuna"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` fails as if absent

    assert main(["diagnose", str(run)]) == 0  # the report stands without its plots
    out = capsys.readouterr().out
    assert "plots: not drawn: drawing plots needs matplotlib" in out
    assert "pip install 'jaxmint[plots]' (or pass --no-plots)" in out
    cases = [
        ["plot", str(run)],
        ["lr-find", str(REPO / "experiments/digits_mlp.py"), "--", "--smoke"],
        ["sweep", str(REPO / "experiments/digits_mlp.py"), "--sweep-dir", str(tmp_path / "s")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "pip install 'jaxmint[plots]'" in err or "pip install 'jaxmint[sweep]'" in err
