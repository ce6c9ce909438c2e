"""The temporary Prefect server of a `python -m flows.pipeline` run that has no server configured.

With no ``PREFECT_API_URL``, Prefect starts a temporary ("ephemeral") server for the run, but only
when the flow first calls the API: after this process has imported Prefect, and after it has
imported Prefect's whole server package just to start the child. The flow then waits the
child's own start (imports, database check, services): 6-7 s of a 12.5 s cached run on 2 cores.

Here the same server is started before the flow process imports Prefect (``flows/__init__.py``
calls :func:`start_if_run_as` first thing), so its start and the flow process's imports run side
by side on two cores, and the flow process never imports Prefect's server package. It is the
server Prefect would have started: Prefect's app (``prefect.server.api.server:create_app``) under
uvicorn on a loopback port, the UI off, only the services of an ephemeral server, the same
database (``PREFECT_HOME``), so the run shows in a later `prefect server start`'s UI as before.
It stops when the flow process exits (after Prefect has sent its last logs), and dies with it
(PR_SET_PDEATHSIG) if that process is killed. Nothing changes when a server is configured (the
environment's or the active Prefect profile's ``PREFECT_API_URL``): the early server, if any, is
stopped unused. If it fails to start, Prefect's own temporary server takes over.

The server process runs :func:`serve` (``python -c "from flows.temporary_server import serve; serve(PORT)"``).
"""

from __future__ import annotations

import atexit
import gc
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from flows.server import free_port, healthy  # the standard library and tasks.lib.processes only
from tasks.lib import processes

STOP_GRACE_SECONDS = 5.0  # as Prefect's own temporary server: SIGTERM, then SIGKILL after 5 s


@dataclass
class EarlyServer:
    process: subprocess.Popen
    api_url: str


_early: EarlyServer | None = None  # the server this process started, until it is stopped


def start_if_run_as(module: str) -> None:
    """Start the server now if this process is ``python -m <module>`` and no ``PREFECT_API_URL``
    is in the environment (a profile's URL is known only once Prefect is imported: see :func:`adopt`)."""
    global _early
    if sys.orig_argv[1:3] != ["-m", module] or os.environ.get("PREFECT_API_URL") or _early:
        return
    port = free_port()
    environment = processes.child_environment(
        PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
    # -c, not -m: `python -m flows.temporary_server` would run this module a second time, as __main__.
    command = [sys.executable, "-c", f"from flows.temporary_server import serve; serve({port})"]
    _early = EarlyServer(processes.start_with_parent(command, environment), f"http://127.0.0.1:{port}/api")
    atexit.register(stop)  # registered before Prefect's own exit handlers, so it runs after them


def stop() -> None:
    """Stop the early server, if this process started one."""
    global _early
    early, _early = _early, None
    if early:
        processes.stop_group(early.process, grace=STOP_GRACE_SECONDS)


def _wait_until_healthy(early: EarlyServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while early.process.poll() is None and time.monotonic() < deadline:
        if healthy(early.api_url):
            return True
        time.sleep(0.05)
    return False


def adopt() -> str | None:
    """Point this process's Prefect at the early server once it answers; its API URL, or None
    when there is no early server, Prefect has a server configured, or the early one failed."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    if _early is None:
        return None
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        stop()  # a profile's server, or no temporary servers allowed: Prefect's choice stands
        return None
    if not _wait_until_healthy(_early, settings.server.ephemeral.startup_timeout_seconds):
        print("temporary server: it did not start; Prefect starts its own", file=sys.stderr)
        stop()
        return None
    os.environ["PREFECT_API_URL"] = _early.api_url
    refresh_global_settings_context()  # Prefect read its settings at import, before the line above
    print(f"Running on a temporary server at {_early.api_url.removesuffix('/api')} (stopped when the flow ends); "
          "`make serve` keeps one running", file=sys.stderr)
    return _early.api_url


def serve(port: int) -> None:
    """The server process: Prefect's server app under uvicorn on ``127.0.0.1:port`` until SIGTERM."""
    # Prefect's server package is a few hundred thousand objects that live until exit: imported with
    # the cyclic collector paused and then frozen out of its sight, as flows/__init__.py does.
    collecting = gc.isenabled()
    gc.disable()
    import uvicorn
    from prefect.server.api.server import create_app

    gc.freeze()
    if collecting:
        gc.enable()
    uvicorn.run(create_app, factory=True, host="127.0.0.1", port=port, log_level="error", lifespan="on")
