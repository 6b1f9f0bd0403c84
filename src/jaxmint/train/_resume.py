"""Resuming a run: the checkpoint's state under the code as it is written now.

What comes from the checkpoint: the step, parameters, optimizer state, learned
loss parameters (matched by name), the RNG and the non-finite guard. What comes
from the code: everything else, the loss weights included. Whatever differs
from the stored run is said (config fields, loss terms, weights), and a
checkpoint whose shapes do not fit the code is refused before anything runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import jax
import numpy as np

from jaxmint._tree import flat_with_names
from jaxmint.checkpoint import CheckpointError
from jaxmint.state import TrainState

if TYPE_CHECKING:
    from jaxmint.train._fit import FitLoop

log = logging.getLogger("jaxmint")

# Parts of the state whose layout follows the loss (terms may be added, removed or
# reordered on resume): restored as stored, then matched by name.
_LOSS_PARTS = ("loss_state", "guard")


def resume(loop: FitLoop, state: TrainState, record: dict) -> tuple[TrainState, int]:
    """``(state, start_step)``: ``state`` restored from the newest readable checkpoint.

    ``state`` is the freshly initialized state (its shapes and shardings are the
    restore target) and ``record`` the run record the loop is about to write.
    Returns ``(state, 0)`` for a run dir without checkpoints.
    """
    ckpt, run = loop.checkpoints, loop.run_dir
    steps = ckpt.steps()
    if not steps:
        return state, 0
    differing = config_changes(run.read_config(), run.as_recorded(record))
    _check_shapes(loop, state, steps[-1], differing)
    fresh = state._asdict()
    step_sharding = getattr(state.step, "sharding", None)

    def target_for(step: int) -> dict:
        stored = ckpt.stored_structure(step) or {}
        target = {k: v for k, v in _abstract(fresh).items() if k not in _LOSS_PARTS}
        for part in _LOSS_PARTS:
            if part in stored and _layout(stored[part]) == _layout(fresh[part]):
                target[part] = _abstract(fresh[part])  # unchanged: today's types (NamedTuples)
            elif part in stored:  # shapes as stored, placed like the (replicated) step counter
                target[part] = jax.tree_util.tree_map(
                    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=step_sharding),
                    stored[part],
                )
            else:
                target[part] = _abstract(fresh[part])
        return target

    restored = ckpt.restore_newest(target_for)
    if restored is None:  # every step was set aside as unreadable: nothing to resume
        return state, 0
    stored, meta, step = restored
    if loop.data.grain is not None:
        loop.data.resume_iterator(ckpt.restore_data(step))
    resumed, notes = loop.steps.resume(stored, state, meta.get("loss_terms"))
    if loop.lead:  # one line, whatever the logging setup: the user sees the run go on
        print(f"resuming {run.path} at step {step} of {loop.settings.steps}", flush=True)
    if differing:
        log.warning("resuming %s with changed config fields: %s", run.path, ", ".join(differing))
    for note in notes:
        log.warning("resuming %s: %s", run.path, note)
    return resumed, step


def config_changes(old: dict, new: dict) -> list[str]:
    """``"field: old -> new"`` for each recorded config field that changed.

    Fields that only steer the run (``steps``, ``workdir``, ``fresh``, ...) are
    not compared; the stored record names them under ``run_control``.
    """
    if "config" not in old:  # nothing recorded (a run dir seeded with a checkpoint only)
        return []
    control = set(old.get("run_control", ())) | set(new.get("run_control", ()))
    before, after = old.get("config", {}), new.get("config", {})
    return [
        f"{k}: {before.get(k, '<absent>')!r} -> {after.get(k, '<absent>')!r}"
        for k in sorted(set(before) | set(after))
        if k not in control and before.get(k) != after.get(k)
    ]


def _check_shapes(loop: FitLoop, state: TrainState, step: int, differing: list[str]) -> None:
    stored = loop.checkpoints.stored_structure(step)
    if stored is None:  # unreadable metadata: restoring the step reports it
        return
    old = _shapes({k: v for k, v in stored.items() if k not in _LOSS_PARTS})
    new = _shapes({k: v for k, v in state._asdict().items() if k not in _LOSS_PARTS})
    bad = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not bad:
        return
    shown = ", ".join(f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}" for k in bad[:5])
    raise CheckpointError(
        f"the run dir {loop.run_dir.path} belongs to a different model: the checkpoint at step "
        f"{step} has different state shapes ({shown}{', ...' if len(bad) > 5 else ''}). Config "
        f"fields that differ: {', '.join(differing) or 'none recorded'}. Use another workdir, "
        "or start over with fresh=True (--fresh on the command line), which moves the old "
        "checkpoints aside."
    )


def _abstract(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _layout(tree) -> dict[str, tuple]:
    """``{path: shape}`` with every path written alike, whether a level is a NamedTuple
    (as built) or a dict or list (as a checkpoint's metadata gives it back)."""

    def part(key) -> str:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(part(k) for k in path): tuple(np.shape(x)) for path, x in flat}


def _shapes(tree) -> dict[str, tuple]:
    return {name: tuple(np.shape(x)) for name, x in flat_with_names(tree).items()}
