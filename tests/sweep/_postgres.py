"""A throwaway PostgreSQL server on loopback for the sweep tests (Debian's package).

``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as the
package's ``postgres`` user (``runuser``) on a folder it owns. Trust
authentication on 127.0.0.1 only; the server is stopped and its folder removed
when the test ends.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "jaxmint"
DATABASE = "sweeps"


def bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are (Debian keeps them out of PATH), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def why_not() -> str | None:
    if bindir() is None:
        return "PostgreSQL is not installed (apt-get install -y postgresql; scripts/setup.sh does)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "as root, the server needs runuser to start as the postgres user"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install 'jaxmint[postgres]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="jaxmint-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{DATABASE}"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8")
        self.start()
        import psycopg2

        c = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres")
        try:
            c.autocommit = True  # CREATE DATABASE runs outside a transaction
            c.cursor().execute(f"CREATE DATABASE {DATABASE}")
        finally:
            c.close()

    def _run(self, tool: str, *args) -> None:
        argv = [str(bindir() / tool), *map(str, args)]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.root)
        if out.returncode:
            log = (
                (self.root / "server.log").read_text()
                if (self.root / "server.log").exists()
                else ""
            )
            raise RuntimeError(f"{tool} failed: {out.stderr[-2000:]}\n{log[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-o",
            options,
            "-l",
            self.root / "server.log",
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
