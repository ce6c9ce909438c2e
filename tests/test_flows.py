"""The Prefect flow and the scheduled deployment, against a real `prefect server` on loopback.

One server (SQLite, temporary PREFECT_HOME, free port) serves the whole module. Flow runs and
the serving process are separate OS processes, as an operator would run them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flows.server import PrefectServer, start_server

from .conftest import dvc, make_params_document, make_project, prefect_api, tool_environment

pytestmark = [pytest.mark.server, pytest.mark.slow]

# Fields of dvc.lock that record timings (steps/s, seconds, timestamps) and so differ between runs.
TIMING_OUTPUTS = {"reports/train/metrics.json", "reports/metrics.json", "reports/promotion.json",
                  "models/registry.json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("prefect-home")
    # Queued deployment runs retry for a concurrency slot every 2 s instead of 30 s.
    running = start_server(home, extra_environment={"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"})
    yield running
    running.stop()


def _environment(server: PrefectServer) -> dict[str, str]:
    return tool_environment() | server.client_environment() | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"}



def _run_flow(project: Path, server: PrefectServer) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=project, env=_environment(server),
                          capture_output=True, text=True, timeout=600)


async def _latest_flow_run_tasks(client) -> tuple[object, dict[str, object]]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    flow_run = (await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1))[0]
    tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return flow_run, {task.name: task for task in tasks}


def _comparable_lock(project: Path) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        stage["outs"] = [out for out in stage["outs"] if out["path"] not in TIMING_OUTPUTS]
        stage["deps"] = [dep for dep in stage["deps"] if dep["path"] not in TIMING_OUTPUTS]
    return lock


def test_flow_runs_every_stage_then_skips_them_all(server: PrefectServer, tmp_path: Path,
                                                    synthetic_source: Path) -> None:
    document = make_params_document(synthetic_source)
    project = make_project(tmp_path / "flow", document | {"schedule": document["schedule"] | {"push": True}})
    dvc(project, "remote", "add", "--local", "-d", "store", str(tmp_path / "remote"))
    first = _run_flow(project, server)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'train'" in first.stdout + first.stderr  # stage output streamed into the run log
    flow_run, tasks = prefect_api(server, _latest_flow_run_tasks)
    assert flow_run.state_name == "Completed"
    assert {name: task.state_name for name, task in tasks.items()} == {
        "download": "Completed", "train": "Completed", "evaluate": "Completed", "promote": "Completed"}
    artifacts = {artifact.key: artifact for artifact in prefect_api(server, lambda client: client.read_artifacts())}
    assert {"evaluation-metrics", "promotion-decision", "run-pictures"} <= set(artifacts)
    # the three PNGs, on the description's first line: what the UI's Artifacts tab shows (docs/orchestration.md)
    assert artifacts["run-pictures"].description.splitlines()[0].count("](data:image/png;base64,iVBORw0KGgo") == 3
    assert json.loads((project / "reports" / "promotion.json").read_text())["version"] == 1
    assert any((tmp_path / "remote" / "files").rglob("*")), "schedule.push did not push to the remote"

    second = _run_flow(project, server)
    assert second.returncode == 0, second.stdout + second.stderr
    _, tasks = prefect_api(server, _latest_flow_run_tasks)
    assert {task.state_name for task in tasks.values()} == {"Skipped"} and len(tasks) == 4

    twin = make_project(tmp_path / "repro", document | {"schedule": document["schedule"] | {"push": True}})
    dvc(twin, "repro")
    assert _comparable_lock(twin) == _comparable_lock(project)
    assert "up to date" in dvc(project, "status").stdout


def test_failing_download_is_retried_then_fails_clearly(server: PrefectServer, tmp_path: Path,
                                                        synthetic_source: Path) -> None:
    document = make_params_document(synthetic_source)
    document["data"]["sources"] = [str(tmp_path / "no-such-mirror")]
    document["schedule"].update(download_retries=1, retry_delay_seconds=0)
    project = make_project(tmp_path / "broken", document)
    result = _run_flow(project, server)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "no source delivered verified MNIST" in output and "no-such-mirror is not a directory" in output
    flow_run, tasks = prefect_api(server, _latest_flow_run_tasks)
    assert flow_run.state_name == "Failed"
    assert set(tasks) == {"download"} and tasks["download"].run_count == 2  # one try + one retry
    assert not (project / "models").exists()


def test_bad_params_fail_before_any_stage(server: PrefectServer, tmp_path: Path, synthetic_source: Path) -> None:
    document = make_params_document(synthetic_source)
    document["train"]["learnig_rate"] = 0.1
    project = make_project(tmp_path / "typo", document)
    result = _run_flow(project, server)
    assert result.returncode == 1
    assert "train.learnig_rate: unknown key (did you mean 'learning_rate'?)" in result.stdout + result.stderr
    _, tasks = prefect_api(server, _latest_flow_run_tasks)
    assert tasks == {}


def _start_serving(project: Path, server: PrefectServer) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.deploy"], cwd=project, env=_environment(server),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def _deployment(client):
    from prefect.exceptions import ObjectNotFound

    try:
        return await client.read_deployment_by_name("mnist-pipeline/nightly-retrain")
    except ObjectNotFound:
        return None


async def _runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _trigger_two_runs_and_wait(server: PrefectServer) -> list:
    from prefect.deployments import run_deployment
    from prefect.flow_runs import wait_for_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        runs = [run_deployment("mnist-pipeline/nightly-retrain", timeout=0) for _ in range(2)]

        async def wait_all():
            return await asyncio.gather(*(wait_for_flow_run(run.id, timeout=600) for run in runs))

        return asyncio.run(wait_all())


def test_scheduled_deployment_registers_runs_and_never_overlaps(server: PrefectServer, tmp_path: Path,
                                                                synthetic_source: Path) -> None:
    document = make_params_document(synthetic_source)
    document["schedule"].update(cron="30 2 * * *", timezone="Europe/Paris")
    project = make_project(tmp_path / "deployed", document)
    serving = _start_serving(project, server)
    try:
        deployment = _wait_for(lambda: prefect_api(server, _deployment), 120, "the deployment to register")
        schedule = deployment.schedules[0]
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (
            "30 2 * * *", "Europe/Paris", True)
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
        _wait_for(lambda: [r for r in prefect_api(server, lambda c: _runs_of(c, deployment.id)) if r.auto_scheduled],
                  60, "scheduled runs to appear")

        first, second = sorted(_trigger_two_runs_and_wait(server), key=lambda run: run.start_time)
        assert first.state_name == second.state_name == "Completed"
        assert first.end_time <= second.start_time, "two runs of the deployment overlapped"
        assert (project / "models" / "production" / "1" / "saved_model.pb").is_file()
    finally:
        _stop(serving)
    stopped = prefect_api(server, _deployment)
    assert stopped.schedules[0].active and not stopped.paused  # serving stopped; the schedule did not
    restarted = _start_serving(project, server)  # the schedule survives a restart of the serving process
    try:
        again = _wait_for(lambda: (d := prefect_api(server, _deployment)) and d.updated > stopped.updated and d, 120,
                          "the restarted process to register the deployment again")
        assert again.id == deployment.id and again.schedules[0].active and not again.paused
    finally:
        _stop(restarted)


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C, as an operator would; a process still busy starting up may miss it, so then kill."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_ui_of_a_server_on_any_port_talks_to_that_server(tmp_path: Path, synthetic_source: Path) -> None:
    """The UI page asks /ui-settings where the API is; it must be this server's, not port 4200's."""
    started = start_server(tmp_path / "ui-home", ui=True)  # a free port: not Prefect's default
    try:
        with urllib.request.urlopen(f"{started.ui_url}/ui-settings", timeout=10) as response:
            api_url = json.load(response)["api_url"]
        assert api_url == started.api_url and not api_url.endswith(":4200/api")
        document = make_params_document(synthetic_source)
        document["train"]["learnig_rate"] = 0.1  # a run that fails at once still shows in the UI
        result = _run_flow(make_project(tmp_path / "shown", document), started)
        assert result.returncode == 1
        request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:  # what the UI asks, at the URL it was given
            runs = json.load(response)
        assert [run["state_name"] for run in runs] == ["Failed"]
    finally:
        started.stop()


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_stage_before_the_flow_exits_with_one_line(
        server: PrefectServer, tmp_path: Path, synthetic_source: Path, sent: signal.Signals) -> None:
    from .test_team_crash import alive, command_line, descendants

    document = make_params_document(synthetic_source, train={"steps": 20000})  # minutes: surely running
    project = make_project(tmp_path / "flow", document)
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline"], cwd=project, env=_environment(server),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any("-m tasks.train" in command_line(pid) for pid in descendants(flow.pid)):
        assert flow.poll() is None and time.monotonic() < deadline, "the flow never reached train"
        time.sleep(0.5)
    children = descendants(flow.pid)  # `dvc repro` and the stage
    flow.send_signal(sent)
    _, stderr = flow.communicate(timeout=120)
    assert flow.returncode == 130
    assert not any(alive(pid) for pid in children), [command_line(pid) for pid in children if alive(pid)]
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == ("interrupted: the running stage was stopped; "
                                       "dvc.lock records the stages that finished")
