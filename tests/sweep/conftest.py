"""A tiny experiment for sweep tests: a linear model whose objective is known in advance.

``eval/score`` equals the ``quality`` field at every step, so a test knows which trials
a pruner must stop; ``mode="boom"`` makes ``build`` raise; ``delay`` slows each batch
(a trial long enough to be killed mid-way, with a checkpoint to resume from).
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from jaxmint.cli import main; sys.exit(main())"

TINY = '''
import dataclasses
import time

import jax.numpy as jnp
import numpy as np
import optax

import jaxmint
from jaxmint import losses
from jaxmint.config import field
from jaxmint.experiment import Common, Experiment
from jaxmint.sweep import Categorical, Grid, Int, LogUniform, Spec, Uniform


@dataclasses.dataclass
class Config(Common):
    """A tiny linear classifier."""

    steps: int = field(20, "steps")
    batch_size: int = field(16, "batch")
    eval_every: int = field(5, "eval")
    checkpoint_every: int = field(10, "ckpt")
    log_every: int = field(5, "log")
    quality: float = field(0.5, "the objective, reported as eval/score")
    mode: str = field("ok", "ok | boom (build raises)")
    delay: float = field(0.0, "seconds of sleep per batch")
    width: int = field(4, "unused width (an Int parameter)")


SMOKE = dict(steps=10)


class Slow:
    def __init__(self, data, batch, delay):
        self.data, self.batch, self.delay = data, batch, delay

    def __iter__(self):
        i = 0
        while True:
            time.sleep(self.delay)
            lo = (i * self.batch) % 64
            yield {k: v[lo : lo + self.batch] for k, v in self.data.items()}
            i += 1


def build(config):
    if config.mode == "boom":
        raise RuntimeError("boom: this trial's build() fails on purpose")
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(80, 3)).astype(np.float32),
            "y": rng.integers(0, 2, size=80).astype(np.int32)}
    model = jaxmint.models.mlp((), num_outputs=2)
    train = Slow(data, config.batch_size, config.delay) if config.delay else data
    q = config.quality
    return Experiment(
        model=model,
        loss=losses.softmax_cross_entropy(),
        optimizer=optax.sgd(config.lr),
        train=train,
        eval=data,
        metrics={"score": lambda out, batch: jnp.full(batch["y"].shape, q)},
    )


def sweep():
    return Spec(SPACE, objective="eval/score", direction="maximize", trials=TRIALS,
                sampler=SAMPLER, pruner=PRUNER, seed=SEED, pruner_options=PRUNER_OPTIONS)
'''


@pytest.fixture
def tiny(tmp_path):
    """Write the tiny experiment with a given sweep(); returns its path."""

    def write(
        space,
        trials=8,
        sampler="random",
        pruner="median",
        seed=0,
        pruner_options=None,
        name="tiny.py",
    ):
        head = textwrap.dedent(TINY)
        tail = (
            f"\nSPACE = {space}\nTRIALS = {trials!r}\nSAMPLER = {sampler!r}\n"
            f"PRUNER = {pruner!r}\nSEED = {seed!r}\nPRUNER_OPTIONS = {pruner_options or {}!r}\n"
        )
        path = tmp_path / name
        path.write_text(head + tail)
        return path

    return write


def run_cli(*args, timeout=150, **kwargs):
    """Run ``python -m jaxmint.cli ARGS`` with a bounded time; returns CompletedProcess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-c", CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


@pytest.fixture
def cli():
    """``cli(*args)``: the jaxmint command in a subprocess (time-bounded)."""
    return run_cli


def trial_past_its_first_checkpoint(sweep_dir, proc, timeout_s: float = 90):
    """``(trial number, worker pid)`` of a running trial that has saved step 10, or None
    if none has within ``timeout_s`` (or the sweep ``proc`` ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for beat in (sweep_dir / "heartbeats").glob("*.json"):
            if (sweep_dir / "trials" / beat.stem / "checkpoints" / "10").exists():
                try:
                    return int(beat.stem), json.loads(beat.read_text())["pid"]
                except (OSError, ValueError):
                    continue
        time.sleep(0.1)
    return None
