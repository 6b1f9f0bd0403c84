"""Multi-host setup with `jax.distributed`: explicit, or detected on a cluster."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("jaxmint")

# Environment variables that mean "launched as one of several processes" for
# launchers that jax.distributed.initialize() detects by itself.
_CLUSTER_HINTS = {
    "SLURM_NTASKS": "SLURM",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "JAX_COORDINATOR_ADDRESS": "JAX_COORDINATOR_ADDRESS",
}


def detected_cluster() -> str | None:
    """The launcher that started several processes, if any (SLURM, Open MPI, ...)."""
    for var, name in _CLUSTER_HINTS.items():
        value = os.environ.get(var)
        if value and (not value.isdigit() or int(value) > 1):
            return name
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join a multi-process run; returns whether this is one.

    With ``coordinator`` (``host:port``), ``num_processes`` and ``process_id`` the
    processes find each other explicitly; without them, a cluster launcher that
    JAX knows (SLURM, Open MPI, TPU pods, Kubernetes through
    ``JAX_COORDINATOR_ADDRESS``) is detected. On CPU the collectives use gloo.
    Call it before anything touches the devices.
    """
    explicit = coordinator is not None
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            "--coordinator needs --num-processes and --process-id as well (got "
            f"num_processes={num_processes}, process_id={process_id})"
        )
    cluster = None if explicit else detected_cluster()
    if not explicit and cluster is None:
        return False
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    log.info(
        "process %d/%d joined (%s); %d local and %d global devices",
        jax.process_index(),
        jax.process_count(),
        cluster or coordinator,
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
