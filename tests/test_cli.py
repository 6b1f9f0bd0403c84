"""The jaxmint command."""

import optax

import jaxmint
from jaxmint.cli import main


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
