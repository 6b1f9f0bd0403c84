"""A throwaway Ray cluster on loopback for the sweep tests: a head and one more node.

Started with Ray's own ``ray start`` (as a user would), without a dashboard, with
a small object store, in a short temporary folder (Ray's socket paths must fit in
108 bytes); ``ray stop`` ends it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"


def why_not() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install 'jaxmint[ray]')"
    if not RAY.exists():
        return f"no ray command next to {sys.executable}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 2):
        self.root = Path(tempfile.mkdtemp(prefix="jr-", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        common = ["--num-cpus", str(cpus_per_node), "--num-gpus", "0"]
        common += ["--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
        self._ray(
            "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
            "--include-dashboard=false", "--temp-dir", str(self.root), *common,
        )  # fmt: skip
        for _ in range(nodes - 1):
            self._ray("start", "--address", self.address, "--node-ip-address", "127.0.0.1",
                      *common)  # fmt: skip

    def _ray(self, *args: str) -> str:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        out = subprocess.run(
            [str(RAY), *args], capture_output=True, text=True, timeout=180, env=env
        )
        if out.returncode:
            raise RuntimeError(f"ray {args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return out.stdout

    def close(self) -> None:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)
