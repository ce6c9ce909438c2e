"""A throwaway PostgreSQL cluster for tests: Debian's server binaries, a data directory under the
test's scratch space, a free loopback port, stopped at the end. PostgreSQL refuses to run as root,
so as root the cluster belongs to the `postgres` user (`runuser`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flows.server import free_port

BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def available() -> bool:
    return bool(BINARIES) and (os.geteuid() != 0 or shutil.which("runuser") is not None)


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str]) -> None:
    result = subprocess.run(_as_owner(command), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")


@contextlib.contextmanager
def cluster(database: str = "prefect") -> Iterator[str]:
    """A running PostgreSQL with one empty database; yields its asyncpg URL for Prefect. Its files
    live in a directory of their own under the system's temporary directory (the `postgres` user
    cannot reach a root-only pytest directory), removed at the end."""
    binaries = BINARIES[-1]
    directory = Path(tempfile.mkdtemp(prefix="mnist-postgresql-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    data, port = directory / "data", free_port()
    _run([str(binaries / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8"])
    _run([str(binaries / "pg_ctl"), "-D", str(data), "-l", str(directory / "server.log"), "-w", "start",
          "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1"])
    try:
        _run([str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", database])
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/{database}"
    finally:
        _run([str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(directory, ignore_errors=True)


def query(url: str, sql: str) -> str:
    """One value of ``sql`` through psql (the server, not Prefect, answers)."""
    address = url.split("@", 1)[1]
    host_port, database = address.split("/", 1)
    host, port = host_port.split(":")
    result = subprocess.run(["psql", "-h", host, "-p", port, "-U", "prefect", "-d", database, "-tAc", sql],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()
