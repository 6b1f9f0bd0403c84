"""Char transformer: a byte-level decoder-only language model on the Python standard library.

Loss = cross-entropy + z-loss, composed through the loss algebra; the z-loss weight
ramps up on a schedule evaluated inside the compiled step.

    python experiments/char_transformer.py                  # minutes on a 2-core CPU
    python experiments/char_transformer.py --d-model 256 --num-layers 4 --seq-len 256
    python experiments/char_transformer.py --seq-len 2048 --attention-chunk 256 --remat full
    python experiments/char_transformer.py --smoke --workdir /tmp/smoke
    python experiments/char_transformer.py --data ~/corpus --data-workers 2   # your own text
    jaxmint sweep experiments/char_transformer.py --sweep-dir runs/sweep_char   # sweep()
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import optax

import jaxmint
from jaxmint import losses
from jaxmint.config import field
from jaxmint.experiment import Common, Experiment
from jaxmint.sweep import Categorical, Int, LogUniform, Spec


@dataclasses.dataclass
class Config(Common):
    """Train a small causal transformer on the standard library's source bytes."""

    workdir: str = field("runs/char_transformer", "run directory (resumed if it holds checkpoints)")
    steps: int = field(600, "optimizer steps to train for")
    batch_size: int = field(32, "global batch size (sequences)")
    lr: float = field(3e-3, "peak learning rate (warmup then cosine decay)", min=0.0)
    eval_every: int = field(200, "evaluate every N steps (and at the end)")
    checkpoint_every: int = field(200, "checkpoint every N steps (and at the end)")
    seq_len: int = field(128, "tokens (bytes) per sequence", min=1)
    d_model: int = field(128, "model width (a multiple of --num-heads)", min=1)
    num_layers: int = field(2, "transformer blocks", min=1)
    num_heads: int = field(4, "attention heads", min=1)
    z_loss_weight: float = field(1e-4, "final weight of the z-loss term", min=0.0)
    corpus_bytes: int = field(2_000_000, "bytes of standard-library source to train on", min=10_000)
    data: str = field(
        "",
        "train on the text files at PATH (a file or a folder, read by memory map through a "
        "Grain pipeline) instead of the standard library; its last 5%% is held out",
    )
    warmup: int = field(50, "learning-rate warmup steps", min=0)
    remat: Literal["none", "full", "dots", "dots_no_batch"] = field(
        "none",
        "recompute each block's activations in the backward pass (less memory)",
        run_control=True,  # same gradients: a resumed run may switch it
    )
    scan_layers: bool = field(
        False, "run the blocks as one scan over weights stacked by layer (one block compiled)"
    )
    attention_chunk: int = field(
        0,
        "score attention N queries at a time, for long --seq-len (0: all at once)",
        min=0,
        run_control=True,  # the same numbers: a resumed run may switch it
    )

    def check_values(self) -> None:
        super().check_values()
        if self.d_model % self.num_heads:
            raise ValueError(
                f"--d-model {self.d_model} is not a multiple of --num-heads {self.num_heads}"
            )


SMOKE = dict(
    steps=12,
    eval_every=6,
    checkpoint_every=6,
    log_every=3,
    seq_len=32,
    d_model=32,
    num_layers=1,
    num_heads=2,
    corpus_bytes=60_000,
    batch_size=8,
    warmup=2,
)


def build(config: Config) -> Experiment:
    if config.data:  # any corpus on disk, however large: windows read as they are needed
        train = jaxmint.data.ByteWindows(config.data, config.seq_len, split=(0.0, 0.95))
        test = jaxmint.data.ByteWindows(config.data, config.seq_len, split=(0.95, 1.0))
        test = test.arrays(limit=256)
    else:
        train, test = jaxmint.data.stdlib_chars(config.seq_len, max_bytes=config.corpus_bytes)
        test = {k: v[:256] for k, v in test.items()}  # evaluation stays cheap
    model = jaxmint.models.transformer(
        256,
        max_len=config.seq_len,
        d_model=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        attention=(  # both export to ONNX too
            jaxmint.models.chunked_attention(config.attention_chunk)
            if config.attention_chunk
            else jaxmint.models.portable_attention
        ),
        remat=config.remat,
        scan_layers=config.scan_layers,
    )
    ramp = optax.linear_schedule(0.0, config.z_loss_weight, max(config.steps // 4, 1))
    loss = losses.softmax_cross_entropy() + ramp * losses.z_loss()
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, min(config.warmup, config.steps - 1), config.steps
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.1))
    return Experiment(
        model=model,
        loss=loss,
        optimizer=optimizer,
        train=train,
        eval=test,
        metrics={"accuracy": jaxmint.metrics.accuracy()},
    )


def sweep() -> Spec:
    """What `jaxmint sweep` searches; the z-loss weight is a loss-term weight like any field."""
    return Spec(
        space={
            "lr": LogUniform(3e-4, 1e-2),
            "d_model": Categorical([64, 128, 256]),
            "num_layers": Int(1, 4),
            "z_loss_weight": LogUniform(1e-5, 1e-2),
        },
        objective="eval/loss",
        direction="minimize",
        trials=24,
        sampler="tpe",
        pruner="asha",
    )


if __name__ == "__main__":
    jaxmint.experiment.main(build, Config, smoke=SMOKE)
