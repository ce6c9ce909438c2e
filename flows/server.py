"""Start and stop a real `prefect server` on a loopback port (or all interfaces, for a team).

Used by `python -m flows.deploy --start-server` (`make serve`), by the tests, and by the
benchmarks, and on its own as the team's server:

    python -m flows.server [--host 0.0.0.0] [--port 4200] [--home .prefect]   # Ctrl-C stops it
        [--database-url postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect]

The database is SQLite in ``PREFECT_HOME`` (``<home>/prefect.db``) by default: right for one
machine. A team's server, which many workers write flow runs to at once, takes PostgreSQL
(``--database-url``; Prefect creates its tables at start; tests/test_server.py runs a flow
against a real PostgreSQL).

The UI is a page that asks the server's ``/ui-settings`` where the API is. Prefect answers
with ``PREFECT_UI_API_URL``, which defaults to host and port from the settings
(127.0.0.1:4200), not from ``--port``: a server started on another port would serve a UI
that talks to port 4200. So every server started here is told its own API URL.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks.lib import processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PrefectServer:
    process: subprocess.Popen
    api_url: str
    home: Path

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def client_environment(self) -> dict[str, str]:
        """What a client process needs to talk to this server."""
        return {"PREFECT_API_URL": self.api_url, "DO_NOT_TRACK": "1"}

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # graceful; SIGTERM would end it at once
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def healthy(api_url: str) -> bool:
    """Whether the Prefect server of ``api_url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def advertised_host(host: str) -> str:
    """The name clients and the UI use for a server listening on ``host`` (all interfaces: this machine's)."""
    if host not in ("0.0.0.0", "::"):
        return host
    name = socket.getfqdn()
    return socket.gethostname() if name.startswith("localhost") else name


def start_server(home: Path, port: int | None = None, ui: bool = False, timeout: float = 180,
                 extra_environment: dict[str, str] | None = None, host: str = "127.0.0.1",
                 database_url: str | None = None) -> PrefectServer:
    """Start `prefect server start` and wait until /api/health answers (migrations done).

    ``database_url``: the server's database, e.g. ``postgresql+asyncpg://user:password@host:5432/prefect``
    (what a team runs: many workers write flow runs at once); default SQLite in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://{advertised_host(host)}:{port}/api"
    environment = processes.child_environment(
        PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED=str(ui).lower(),
        DO_NOT_TRACK="1",
        # The UI must talk to this server's API, whatever the port (see the module docstring).
        PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port), PREFECT_SERVER_UI_API_URL=api_url)
    for stale in ("PREFECT_API_URL", "PREFECT_UI_API_URL"):  # a client's URL, or the older alias
        environment.pop(stale, None)
    if database_url:
        environment["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    environment.update(extra_environment or {})
    log = open(home / "server.log", "ab")  # noqa: SIM115 - the server process owns it from here
    command = processes.python_module("prefect", "server", "start", "--host", host, "--port", str(port))
    process = processes.start(command, environment, log)
    server = PrefectServer(process, api_url, home)
    local_api = f"http://127.0.0.1:{port}/api" if host in ("0.0.0.0", "::") else api_url
    deadline = time.monotonic() + timeout
    while not healthy(local_api):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = (home / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"prefect server did not become healthy on port {port}:\n{tail}")
        time.sleep(0.3)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a Prefect server whose UI talks to its own API.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0: reachable by workers on other machines")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--home", type=Path, default=Path(".prefect"), help="PREFECT_HOME: the database and logs")
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="PostgreSQL for a team: postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB (default SQLite)")
    args = parser.parse_args(argv)
    # `kill` as well as Ctrl-C stops the server with this process (it runs in its own session).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = start_server(args.home.resolve(), args.port, ui=True, host=args.host, database_url=args.database_url)
    print(f"server: UI at {server.ui_url}; clients and workers: export PREFECT_API_URL={server.api_url}", flush=True)
    try:
        server.process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
