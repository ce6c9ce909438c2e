"""flows/temporary_server.py: `python -m flows.pipeline` with no server configured runs on a temporary
server started before Prefect's import, records the run in PREFECT_HOME, and leaves no process behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.server import start_server

from .conftest import make_params_document, make_project, prefect_api, tool_environment
from .test_team_crash import alive, command_line

pytestmark = [pytest.mark.server, pytest.mark.slow]

ANNOUNCED = re.compile(r"Running on a temporary server at http://127\.0\.0\.1:(\d+) ")


def _flow_environment(home: Path, **extra: str) -> dict[str, str]:
    """The flow's environment, marked with ``home``: its temporary server inherits the mark, so a
    test finds its own server and not those of tests running beside it (`pytest -n`)."""
    environment = tool_environment() | {"PREFECT_HOME": str(home), "MNIST_TEST_FLOW_HOME": str(home), **extra}
    for configured in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        environment.pop(configured, None)
    environment.update(extra)
    return environment


def _servers(port: str | None = None) -> list[int]:
    """The pids of temporary server processes (of ``port``, or any)."""
    pattern = f"serve({port})" if port else "from flows.temporary_server import serve"
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and pattern in command_line(int(entry.name)) and alive(int(entry.name))]


def _servers_of(home: Path) -> list[int]:
    """The temporary servers started by flows run with ``_flow_environment(home)``."""
    mark = f"MNIST_TEST_FLOW_HOME={home}".encode() + b"\0"
    found = []
    for pid in _servers():
        try:
            if mark in (Path("/proc") / str(pid) / "environ").read_bytes() + b"\0":
                found.append(pid)
        except OSError:
            continue
    return found


def _bad_params_project(root: Path, synthetic_source: Path) -> Path:
    """A project whose flow fails at once, before any stage: a recorded run, in seconds."""
    return make_project(root, make_params_document(synthetic_source, train={"steps": -1}))


def _flow_runs(home: Path) -> list[object]:
    server = start_server(home)
    try:
        return prefect_api(server, lambda client: client.read_flow_runs())
    finally:
        server.stop()


def test_the_run_is_recorded_through_the_early_server_which_stops_with_the_flow(
        tmp_path: Path, synthetic_source: Path) -> None:
    project = _bad_params_project(tmp_path / "project", synthetic_source)
    home = tmp_path / "home"
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(project)],
                            env=_flow_environment(home), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    announced = ANNOUNCED.search(result.stderr)
    assert announced, result.stderr
    assert "Starting temporary server" not in result.stderr  # Prefect did not start one of its own
    assert "error: the pipeline flow ended Failed: " in result.stderr and "train.steps = -1" in result.stderr
    assert _servers(announced.group(1)) == []  # stopped when the flow process ended
    runs = _flow_runs(home)  # the database in PREFECT_HOME, read by a server started afterwards
    assert [(run.flow_id is not None, run.state.type.value) for run in runs] == [(True, "FAILED")]


def test_a_profiles_server_is_used_and_the_early_server_stopped(tmp_path: Path, synthetic_source: Path) -> None:
    project = _bad_params_project(tmp_path / "project", synthetic_source)
    server = start_server(tmp_path / "server-home")
    try:
        profiles = tmp_path / "profiles.toml"
        profiles.write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{server.api_url}"\n')
        environment = _flow_environment(tmp_path / "home", PREFECT_PROFILES_PATH=str(profiles))
        result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(project)],
                                env=environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr
        assert not ANNOUNCED.search(result.stderr) and "temporary server" not in result.stderr
        assert _servers_of(tmp_path / "home") == []
        runs = prefect_api(server, lambda client: client.read_flow_runs())
        assert [run.state.type.value for run in runs] == ["FAILED"]
    finally:
        server.stop()


def test_a_killed_flow_takes_its_temporary_server_with_it(tmp_path: Path, synthetic_source: Path) -> None:
    document = make_params_document(synthetic_source, train={"steps": 20000})  # minutes: still running when killed
    project = make_project(tmp_path / "project", document)
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--repo", str(project)],
                            env=_flow_environment(tmp_path / "home"), stderr=subprocess.PIPE, text=True)
    port = None
    for line in flow.stderr:  # type: ignore[union-attr]
        if announced := ANNOUNCED.search(line):
            port = announced.group(1)
            break
    assert port and _servers(port) == _servers_of(tmp_path / "home") != [], "no temporary server announced"
    flow.send_signal(signal.SIGKILL)
    flow.wait()
    deadline = time.monotonic() + 30
    while _servers(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _servers(port) == [] and _servers_of(tmp_path / "home") == []


def test_no_temporary_servers_allowed_means_none_is_left_running(tmp_path: Path, synthetic_source: Path) -> None:
    project = _bad_params_project(tmp_path / "project", synthetic_source)
    environment = _flow_environment(tmp_path / "home", PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false")
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(project)],
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "No Prefect API URL provided" in result.stderr  # Prefect's own refusal, unchanged
    assert _servers_of(tmp_path / "home") == []


def test_importing_the_flows_starts_no_server() -> None:
    """Only `python -m flows.pipeline` starts one: a test, a worker or `flows.deploy` importing the flow does not."""
    import flows.pipeline  # noqa: F401
    import flows.temporary_server as temporary_server

    assert sys.orig_argv[1:3] != ["-m", "flows.pipeline"]
    assert temporary_server._early is None and temporary_server.adopt() is None
