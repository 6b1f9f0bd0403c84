"""Learning-rate range test: train briefly while the learning rate grows exponentially."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import optax

from jaxmint._extras import pyplot
from jaxmint.data import ArrayLoader
from jaxmint.train import build_steps


@dataclass
class LRFind:
    """The losses seen at each learning rate, and the suggested learning rate."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    suggestion: float = float("nan")
    min_loss_lr: float = float("nan")

    def plot(self, path: str | os.PathLike) -> Path:
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(self.lrs, self.losses, label="loss (smoothed)")
        ax.axvline(
            self.suggestion,
            color="tab:red",
            linestyle="--",
            label=f"suggested {self.suggestion:.1e}",
        )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)


def lr_find(
    model,
    loss,
    data,
    *,
    batch_size: int,
    steps: int = 100,
    lr_min: float = 1e-7,
    lr_max: float = 1.0,
    seed: int = 0,
    input_key: str = "x",
    make_optimizer=optax.adam,
    smoothing: float = 0.9,
) -> LRFind:
    """Run ``steps`` steps with the learning rate growing from ``lr_min`` to ``lr_max``.

    A fresh copy of the state is trained (nothing of a run is touched); the test
    stops early once the smoothed loss exceeds 4x its minimum. The suggestion is
    the learning rate where the smoothed loss falls fastest (per log-LR), capped at
    a tenth of the learning rate of the minimum loss — the usual reading of the plot.
    """
    if not 0 < lr_min < lr_max:
        raise ValueError(f"need 0 < lr_min < lr_max, got {lr_min} and {lr_max}")
    growth = (lr_max / lr_min) ** (1 / max(steps - 1, 1))
    schedule = lambda count: lr_min * growth**count
    steps_fns = build_steps(model, loss, make_optimizer(schedule), input_key=input_key)
    loader = ArrayLoader(data, batch_size, seed=seed)
    batches = loader.batches(0)
    first = next(loader.batches(0))
    state = jax.jit(steps_fns.init)(jax.random.PRNGKey(seed), first)
    step = jax.jit(steps_fns.train_step, donate_argnums=0)
    result = LRFind()
    avg, best = 0.0, math.inf
    for i in range(steps):
        state, out = step(state, next(batches))
        value = float(out["loss"])
        if not math.isfinite(value):
            break
        avg = smoothing * avg + (1 - smoothing) * value
        smoothed = avg / (1 - smoothing ** (i + 1))
        result.lrs.append(lr_min * growth**i)
        result.losses.append(smoothed)
        best = min(best, smoothed)
        if i > 10 and smoothed > 4 * best:
            break
    if len(result.losses) < 3:
        raise RuntimeError(
            f"the loss diverged within {len(result.losses)} steps: lower lr_min, or give more steps"
        )
    lrs, losses = np.asarray(result.lrs), np.asarray(result.losses)
    result.min_loss_lr = float(lrs[np.argmin(losses)])
    slope = np.gradient(losses, np.log(lrs))
    upto = int(np.argmin(losses)) + 1
    steepest = float(lrs[int(np.argmin(slope[:upto]))])
    result.suggestion = min(steepest, result.min_loss_lr / 10) if upto > 1 else steepest
    return result
