"""Digits MLP: classify scikit-learn's bundled 8x8 handwritten digits (the default experiment).

python experiments/digits_mlp.py                       # about 2,000 steps, seconds on a CPU
python experiments/digits_mlp.py --lr 3e-3 --hidden 512 256 --workdir runs/wide
python experiments/digits_mlp.py --smoke --workdir /tmp/smoke   # the tests' tiny run
jaxmint sweep experiments/digits_mlp.py --sweep-dir runs/sweep_digits --workers 2   # sweep()
"""

from __future__ import annotations

import dataclasses

import optax

import jaxmint
from jaxmint import losses
from jaxmint.config import field
from jaxmint.experiment import Common, Experiment
from jaxmint.sweep import Categorical, LogUniform, Spec, Uniform


@dataclasses.dataclass
class Config(Common):
    """Train an MLP on the digits data."""

    workdir: str = field("runs/digits_mlp", "run directory (resumed if it holds checkpoints)")
    steps: int = field(2000, "optimizer steps to train for")
    batch_size: int = field(128, "global batch size")
    lr: float = field(2e-3, "peak learning rate (warmup then cosine decay)", min=0.0)
    eval_every: int = field(500, "evaluate every N steps (and at the end)")
    checkpoint_every: int = field(500, "checkpoint every N steps (and at the end)")
    hidden: tuple[int, ...] = field((256, 256), "widths of the hidden layers")
    dropout: float = field(0.1, "dropout rate after each hidden layer", min=0.0, max=0.99)
    label_smoothing: float = field(0.05, "label smoothing of the cross-entropy", min=0.0, max=0.99)
    weight_decay: float = field(1e-4, "weight of the L2 term on the kernels", min=0.0)
    warmup: int = field(100, "learning-rate warmup steps", min=0)


SMOKE = dict(steps=40, eval_every=20, checkpoint_every=20, log_every=10, hidden=(32,), warmup=5)


def build(config: Config) -> Experiment:
    train, test = jaxmint.data.digits(seed=config.seed)
    model = jaxmint.models.mlp(config.hidden, num_outputs=10, dropout=config.dropout)
    loss = losses.softmax_cross_entropy(label_smoothing=config.label_smoothing)
    loss = loss + config.weight_decay * losses.l2()
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, min(config.warmup, config.steps - 1), config.steps
    )
    return Experiment(
        model=model,
        loss=loss,
        optimizer=optax.adam(schedule),
        train=train,
        eval=test,
        metrics={"accuracy": jaxmint.metrics.accuracy()},
        labels=[str(digit) for digit in range(10)],  # exported as labels.txt
    )


def sweep() -> Spec:
    """What `jaxmint sweep` searches: any config field, the L2 weight (a loss term) included."""
    return Spec(
        space={
            "lr": LogUniform(1e-4, 3e-2),
            "hidden": Categorical([(64,), (256,), (256, 256)]),
            "label_smoothing": Uniform(0.0, 0.2),
            "weight_decay": LogUniform(1e-6, 1e-2),
        },
        objective="eval/accuracy",
        direction="maximize",
        trials=16,
        sampler="tpe",
        pruner="median",
        pruner_options={"n_startup_trials": 4},
    )


if __name__ == "__main__":
    jaxmint.experiment.main(build, Config, smoke=SMOKE)
