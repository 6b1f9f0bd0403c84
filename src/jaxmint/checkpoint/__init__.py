"""Checkpoints with orbax: async saving, keep-last/keep-best, exact resume, preemption."""

from jaxmint.checkpoint._manager import CheckpointError as CheckpointError
from jaxmint.checkpoint._manager import Preempted as Preempted
from jaxmint.checkpoint._manager import RunCheckpoints as RunCheckpoints
from jaxmint.checkpoint._manager import read_state as read_state
from jaxmint.checkpoint._manager import read_weights as read_weights

__all__ = ["CheckpointError", "Preempted", "RunCheckpoints", "read_state", "read_weights"]
