"""prefect.yaml's build step (`flows.deploy.team_settings`), prefect.yaml itself and the workers'
logging file (flows/worker_logging.yml), without a server.

`prefect deploy --all` against a real server and worker is tested in tests/test_team.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.deploy import GIT_BRANCH_VARIABLE, GIT_URL_VARIABLE, team_settings
from tasks.lib.params import load_params

from .conftest import REPO_ROOT, make_params_document, run_command, tool_environment


@pytest.fixture
def project(tmp_path: Path, synthetic_source: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """params.yaml and prefect.yaml in the working directory, as `prefect deploy` runs them."""
    document = make_params_document(synthetic_source)
    document["schedule"].update(cron="30 2 * * 1", timezone="Europe/Paris", collision_strategy="CANCEL_NEW")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document))
    (tmp_path / "prefect.yaml").write_text((REPO_ROOT / "prefect.yaml").read_text())
    seed = tmp_path / "seed"
    run_command(["git", "init", "-q", "-b", "main", str(seed)], tmp_path)
    run_command(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "--allow-empty",
                 "-m", "first"], seed)
    run_command(["git", "clone", "-q", "--bare", str(seed), str(tmp_path / "team.git")], tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(GIT_BRANCH_VARIABLE, raising=False)
    return tmp_path


def test_committed_prefect_yaml_agrees_with_params_yaml() -> None:
    schedule = load_params(REPO_ROOT / "params.yaml").schedule
    document = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    deployment, cell = document["deployments"]
    assert (deployment["name"], deployment["work_pool"]["name"]) == (schedule.deployment_name, schedule.work_pool)
    # the grid's cells (flows/grid.py) run on the same pool, with heartbeats for crash detection, unscheduled
    assert (cell["name"], cell["entrypoint"], cell["work_pool"]["name"]) == (
        "grid-cell", "flows/grid_cell.py:grid_cell", schedule.work_pool)
    assert "schedules" not in cell and cell["work_pool"]["job_variables"] == deployment["work_pool"]["job_variables"]
    assert deployment["parameters"]["publish"] is True and deployment["concurrency_limit"]["limit"] == 1
    assert document["pull"][0]["prefect.deployments.steps.git_clone"]["repository"] == "{{ team.git_url }}"
    assert [next(iter(step)) for step in document["build"]] == ["flows.deploy.team_settings",
                                                                "flows.deploy.install_crash_detection"]
    environment = deployment["work_pool"]["job_variables"]["env"]
    assert environment == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "{{ team.heartbeat_seconds }}"}


def test_settings_come_from_params_and_the_environment(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GIT_URL_VARIABLE, "team.git")  # a relative path: workers clone from elsewhere
    assert team_settings() == {"git_url": str(project / "team.git"), "git_branch": "main", "cron": "30 2 * * 1",
                               "timezone": "Europe/Paris", "collision_strategy": "CANCEL_NEW",
                               "heartbeat_seconds": "30"}


def test_missing_url_says_which_variable_to_set(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GIT_URL_VARIABLE, raising=False)
    with pytest.raises(ValueError, match=f"set {GIT_URL_VARIABLE} to the team's git repository"):
        team_settings()


def test_missing_branch_fails_at_deploy_time(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GIT_URL_VARIABLE, str(project / "team.git"))
    monkeypatch.setenv(GIT_BRANCH_VARIABLE, "nightly")
    with pytest.raises(ValueError, match="cannot clone branch 'nightly'"):
        team_settings()


def test_work_pool_in_prefect_yaml_must_match_params(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GIT_URL_VARIABLE, str(project / "team.git"))
    prefect_file = project / "prefect.yaml"
    prefect_file.write_text(prefect_file.read_text().replace("name: mnist-pool", "name: gpu-pool"))
    with pytest.raises(ValueError, match="work_pool.name is 'gpu-pool' but params.yaml schedule.work_pool is "
                                         "'mnist-pool'"):
        team_settings()


WORKER_LOGGING = REPO_ROOT / "flows" / "worker_logging.yml"


def test_worker_logging_file_is_prefects_default_plus_the_waiting_run_filter() -> None:
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH, load_logging_config

    ours, default = load_logging_config(WORKER_LOGGING), load_logging_config(DEFAULT_LOGGING_SETTINGS_PATH)
    assert ours.pop("filters") == {"waiting_run": {"()": "flows.worker_logging.WaitingRunFilter"}}
    assert ours["loggers"].pop("prefect.flow_runs.worker") == {"level": "NOTSET", "filters": ["waiting_run"]}
    assert ours == default  # a Prefect upgrade that changes its default shows here


_WORKER_LOGS = """
import uuid
import prefect.main  # Prefect's logging set-up, from PREFECT_LOGGING_SETTINGS_PATH
from prefect.logging.loggers import flow_run_logger
for run in (uuid.uuid4(), uuid.uuid4()):
    worker = flow_run_logger(flow_run_id=run).getChild("worker")  # as BaseWorker.get_flow_run_logger
    for _ in range(3):
        worker.info(f"Aborted submission of flow run '{run}': Server returned a non-pending state 'SCHEDULED'")
    worker.info(f"Aborted submission of flow run '{run}': Server sent an abort signal: gone")
"""


def test_worker_logs_a_waiting_run_once_and_everything_else(tmp_path: Path) -> None:
    environment = tool_environment() | {"PREFECT_LOGGING_SETTINGS_PATH": str(WORKER_LOGGING),
                                        "PREFECT_LOGGING_TO_API_ENABLED": "false"}
    result = subprocess.run([sys.executable, "-c", _WORKER_LOGS], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120, check=True)
    lines = [line for line in result.stderr.splitlines() if "prefect.flow_runs.worker" in line]
    assert [line.split("': ")[1] for line in lines] == [
        "Server returned a non-pending state 'SCHEDULED'", "Server sent an abort signal: gone"] * 2
