"""Team mode against real parts: a `prefect server`, a `prefect worker` process on a `process`
work pool running the deployment of prefect.yaml, a bare git repository as the team's remote, a
local-directory DVC remote, tiny synthetic data.

One team serves the whole module (server, pool, deployment, worker, remotes): the fixture sets it
up with `prefect deploy --all` from the project's own prefect.yaml and runs a first, baseline run
(version 1). Tests run in file order on that shared remote; each leaves it settled (everything
trained and pushed), except the last, which leaves a failed run behind on purpose.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.server import PrefectServer, start_server
from tasks.lib import repository as team_module
from tasks.lib.registry import tags

from .conftest import (
    REPO_ROOT,
    dvc,
    make_params_document,
    make_project,
    prefect_api,
    run_command,
    synthetic_arrays,
    tool_environment,
    write_synthetic,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]  # under `pytest -n`: one worker, whole (conftest.py)

DEPLOYMENT = "mnist-pipeline/nightly-retrain"
POOL = "mnist-pool"
RUN_TIMEOUT = 600
WAITING = "Server returned a non-pending state 'SCHEDULED'"  # the worker, each time a run waits


@dataclass
class Team:
    server: PrefectServer
    root: Path
    remote: Path  # the team's git repository (bare)
    dvc_remote: Path
    worker: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        # TMPDIR: this team's workers keep their runs' directories apart from those of the other test
        # modules running at the same time (`pytest -n`), whose runs would otherwise sweep them.
        scratch = self.root / "tmp"
        scratch.mkdir(exist_ok=True)
        return tool_environment() | self.server.client_environment() | {
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0", "TMPDIR": str(scratch)}

    def worker_environment(self) -> dict[str, str]:
        """A worker's: the logging file of the checkout it runs from, as docs/team.md starts one."""
        return self.environment() | {"PREFECT_LOGGING_SETTINGS_PATH": str(REPO_ROOT / "flows" / "worker_logging.yml")}

    def prefect(self, *arguments: str, cwd: Path | None = None, extra: dict | None = None) -> str:
        result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *arguments], cwd=cwd or self.root,
                                env=self.environment() | (extra or {}), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"prefect {' '.join(arguments)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def clone(self, directory: Path) -> Path:
        run_command(["git", "clone", "-q", str(self.remote), str(directory)], self.root)
        run_command(["git", "config", "user.email", "teammate@example.invalid"], directory)
        run_command(["git", "config", "user.name", "teammate"], directory)
        return directory

    def refs(self) -> dict[str, str]:
        """Every branch and tag of the remote: what a run pushed, or did not."""
        lines = run_command(["git", "ls-remote", str(self.remote)], self.root).stdout.splitlines()
        return {name: sha for sha, name in (line.split("\t") for line in lines)}

    def head(self) -> str:
        return self.refs()["refs/heads/main"]

    def git(self, *arguments: str) -> str:
        return run_command(["git", "--git-dir", str(self.remote), *arguments], self.root).stdout.strip()



def trigger(team: Team, count: int = 1) -> list:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: team.server.api_url}):
        return [run_deployment(DEPLOYMENT, timeout=0) for _ in range(count)]


def wait(team: Team, runs: list) -> list:
    from prefect.flow_runs import wait_for_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def wait_all():
        return await asyncio.gather(*(wait_for_flow_run(run.id, timeout=RUN_TIMEOUT, log_states=False)
                                      for run in runs))

    with temporary_settings(updates={PREFECT_API_URL: team.server.api_url}):
        return asyncio.run(wait_all())


def run_once(team: Team):
    (run,) = wait(team, trigger(team))
    return run


def logs(team: Team, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    found = prefect_api(team.server, lambda client: client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
    return "\n".join(entry.message for entry in found)


def logged(team: Team, flow_run_id, text: str) -> str:
    """The run's logs once they hold ``text`` (runs ship their logs to the server in batches)."""
    def holding() -> str:
        found = logs(team, flow_run_id)
        return found if text in found else ""

    return _wait_for(holding, 30, f"{text!r} in the logs of flow run {flow_run_id}")


def task_states(team: Team, flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = prefect_api(team.server, lambda client: client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))))
    return {task.name: task.state_name for task in tasks}


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_task(team: Team, run, name: str) -> None:
    """Until task ``name`` of a running flow run has completed; fails at once if the run ended."""
    def done() -> bool:
        flow_run = prefect_api(team.server, lambda client: client.read_flow_run(run.id))
        assert not flow_run.state.is_final(), f"{flow_run.name} ended {flow_run.state_name} before {name} completed"
        return task_states(team, run.id).get(name) == "Completed"

    _wait_for(done, RUN_TIMEOUT, f"task {name} of {run.name}")


def _completed(team: Team, run) -> None:
    assert run.state_name == "Completed", f"{run.name} ended {run.state_name}: {run.state.message}\n" + logs(
        team, run.id)[-4000:]


def teammate_change(team: Team, directory: Path, message: str, section: str, **values: object) -> str:
    """A teammate clones the remote, changes params, commits and pushes; return the commit.

    A `promote` change re-runs promote alone (about 15 s here), a `train` change all but download.
    """
    clone = team.clone(directory)
    document = yaml.safe_load((clone / "params.yaml").read_text())
    document[section].update(values)
    (clone / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    run_command(["git", "commit", "-qam", message], clone)
    run_command(["git", "push", "-q", "origin", "main"], clone)
    return run_command(["git", "rev-parse", "HEAD"], clone).stdout.strip()


def _make_remote(root: Path, source: Path, dvc_remote: Path) -> Path:
    """The team's repository: this project's code, prefect.yaml, a committed DVC remote, tiny data."""
    document = make_params_document(source)
    document["promote"].update(min_improvement=-1.0)  # every candidate above min_accuracy is promoted
    document["schedule"].update(cron="0 3 29 2 *", timezone="Europe/Paris")  # never due during a test
    seed = make_project(root / "seed", document)
    shutil.copy(REPO_ROOT / "prefect.yaml", seed / "prefect.yaml")
    dvc(seed, "remote", "add", "-d", "team", str(dvc_remote))  # committed: every clone knows it
    run_command(["git", "add", "-A"], seed)
    run_command(["git", "commit", "-qm", "Team project with prefect.yaml and a DVC remote"], seed)
    remote = root / "remote.git"
    run_command(["git", "clone", "-q", "--bare", str(seed), str(remote)], root)
    return remote


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    root = tmp_path_factory.mktemp("team")
    source = root / "source"
    write_synthetic(source)
    server = start_server(root / "prefect-home",
                          extra_environment={"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"})
    team = Team(server, root, _make_remote(root, source, root / "dvc-remote"), root / "dvc-remote")
    try:
        team.prefect("work-pool", "create", POOL, "--type", "process")
        # What an operator runs, from a clone of the team's repository (README, "A team").
        operator = team.clone(root / "operator")
        team.prefect("deploy", "--all", cwd=operator, extra={"MNIST_PIPELINE_GIT_URL": str(team.remote)})
        (root / "worker").mkdir()
        log = open(root / "worker.log", "ab")  # noqa: SIM115 - the worker process owns it
        team.worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                                       cwd=root / "worker", env=team.worker_environment(), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        baseline = run_once(team)
        _completed(team, baseline)
        yield team
    finally:
        if team.worker is not None:  # the last test leaves a run behind: no graceful shutdown to wait for
            os.killpg(team.worker.pid, signal.SIGKILL)
            team.worker.wait()
        server.stop()


async def _deployment(client):
    return await client.read_deployment_by_name(DEPLOYMENT)


def test_prefect_deploy_registers_the_work_pool_deployment_from_params(team: Team) -> None:
    deployment = prefect_api(team.server, _deployment)
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("0 3 29 2 *", "Europe/Paris")  # params.yaml, not prefect.yaml
    assert deployment.work_pool_name == POOL
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert deployment.parameters == {"repo": ".", "publish": True}
    (clone_step,) = deployment.pull_steps
    assert clone_step["prefect.deployments.steps.git_clone"] == {
        "id": "clone", "repository": str(team.remote), "branch": "main"}


def test_baseline_run_ran_the_cloned_code_and_registered_version_1(team: Team) -> None:
    from prefect.client.schemas.sorting import FlowRunSort

    (first,) = prefect_api(team.server, lambda client: client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC, limit=1))
    text = logged(team, first.id, "flow code from ")
    code = Path(text.split("flow code from ")[1].split(")")[0])
    assert code.name == "flows" and code.parent.name == "remote-main"  # the worker's clone of the branch
    assert not code.is_relative_to(REPO_ROOT)  # not the installed checkout
    assert team.git("tag", "--list", "mnist-mlp*").split() == ["mnist-mlp#prod#1", "mnist-mlp@v1.0.0"]
    assert team.git("rev-parse", "mnist-mlp@v1.0.0^{commit}") == team.head()


def test_teammates_params_change_is_trained_and_pushed_as_one_commit(team: Team, tmp_path: Path) -> None:
    pushed = teammate_change(team, tmp_path / "teammate", "Train 80 steps", "train", steps=80)
    run = run_once(team)
    _completed(team, run)
    head = team.head()
    assert team.git("rev-list", f"{pushed}..{head}").split() == [head]  # exactly one commit, on top
    assert task_states(team, run.id) == {name: "Completed" for name in (
        "git-sync", "dvc-pull", "download", "train", "evaluate", "promote", "publish")} | {"download": "Skipped"}
    message = team.git("log", "-1", "--format=%B", head)
    assert re.match(rf"Run {run.name}: test accuracy [01]\.\d+, promoted as mnist-mlp version 2\n", message)

    fresh = team.clone(tmp_path / "fresh")
    dvc(fresh, "pull")  # no --allow-missing: every output of the commit is in the DVC remote
    assert "Data and pipelines are up to date" in dvc(fresh, "status").stdout
    diff = json.loads(dvc(fresh, "metrics", "diff", "HEAD~1", "--json").stdout)["reports/metrics.json"]
    assert diff["train.steps"] == {"old": 60, "new": 80, "diff": 20}


def test_run_with_nothing_changed_pushes_nothing(team: Team) -> None:
    before = team.refs()
    run = run_once(team)
    _completed(team, run)
    assert team.refs() == before
    states = task_states(team, run.id)
    assert {states[stage] for stage in ("download", "train", "evaluate", "promote")} == {"Skipped"}
    assert "publish" not in states
    logged(team, run.id, "every stage was up to date; nothing pushed")


def test_two_runs_triggered_together_never_overlap_and_the_second_starts_from_the_first(
        team: Team, tmp_path: Path) -> None:
    pushed = teammate_change(team, tmp_path / "teammate", "Promote above 0.51", "promote", min_accuracy=0.51)
    first, second = sorted(wait(team, trigger(team, 2)), key=lambda run: run.start_time)
    _completed(team, first)
    _completed(team, second)
    assert first.end_time <= second.start_time, "two runs of the deployment overlapped"
    head = team.head()
    assert team.git("rev-list", f"{pushed}..{head}").split() == [head]  # the first pushed one commit
    assert f"Run {first.name}:" in team.git("log", "-1", "--format=%s", head)
    logged(team, second.id, f"starting from main at {head}")  # the second started from it
    assert "publish" not in task_states(team, second.id)  # and found nothing to do
    # It waited for the slot (the worker retried every 2 s), and its log says so once, not every retry.
    assert logs(team, second.id).count(WAITING) == 1, logs(team, second.id)


def test_dvc_artifacts_get_fetches_the_prod_model_which_loads_and_predicts(team: Team, tmp_path: Path) -> None:
    from tasks.lib.model import load_serving_model, predict_logits

    dvc(tmp_path, "artifacts", "get", str(team.remote), "mnist-mlp", "--stage", "prod", "-o", "prod")
    version = max(int(entry.name) for entry in (tmp_path / "prod").iterdir())
    fresh = team.clone(tmp_path / "fresh")
    run_command(["git", "fetch", "-q", "--tags"], fresh)
    assert tags.prod_version(fresh) == version == max(tags.registered_versions(fresh))
    shown = json.loads(run_command([str(Path(sys.executable).parent / "gto"), "show", "--json"], fresh).stdout)
    assert shown["mnist-mlp"]["stage"]["prod"] == f"v{version}.0.0"

    arrays = synthetic_arrays()
    model = load_serving_model(str(tmp_path / "prod" / str(version)))  # as a client would: raw uint8 digits
    logits = predict_logits(model, arrays["t10k-images-idx3-ubyte"], signature="serving_default")
    accuracy = float((np.argmax(logits, axis=1) == arrays["t10k-labels-idx1-ubyte"]).mean())
    registry = json.loads((fresh / "models" / "registry.json").read_text())
    (record,) = [entry for entry in registry if entry.get("promoted") and entry["version"] == version]
    assert accuracy == pytest.approx(record["candidate_accuracy"], abs=1e-9)


def test_fresh_clone_numbers_a_new_version_after_every_registered_one(team: Team, tmp_path: Path) -> None:
    operator = team.clone(tmp_path / "operator")
    run_command(["git", "fetch", "-q", "--tags"], operator)
    registered = tags.registered_versions(operator)
    assert registered == list(range(1, len(registered) + 1))  # versions 1..N, N >= 1 (the baseline)
    teammate_change(team, tmp_path / "teammate", "Train 100 steps", "train", steps=100)
    run = run_once(team)  # the worker starts from a fresh clone of the remote
    _completed(team, run)
    expected = len(registered) + 1
    assert f", promoted as mnist-mlp version {expected}" in team.git("log", "-1", "--format=%s")
    assert team.git("rev-parse", f"mnist-mlp@v{expected}.0.0^{{commit}}") == team.head()


def test_local_loop_never_commits_or_pushes(team: Team, tmp_path: Path) -> None:
    before = team.refs()
    clone = team.clone(tmp_path / "local")
    run_command([sys.executable, "-m", "tasks.commands.pull"], clone)  # what `make run` does first
    document = yaml.safe_load((clone / "params.yaml").read_text())
    document["promote"]["min_accuracy"] = 0.54
    (clone / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    head = run_command(["git", "rev-parse", "HEAD"], clone).stdout
    result = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=clone, env=team.environment(),
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'promote'" in result.stdout + result.stderr
    assert run_command(["git", "rev-parse", "HEAD"], clone).stdout == head
    assert "dvc.lock" in run_command(["git", "status", "--porcelain"], clone).stdout
    assert team.refs() == before


def test_make_run_pulls_what_the_remote_has_then_repro_skips_it(team: Team, tmp_path: Path) -> None:
    clone = team.clone(tmp_path / "fresh")
    result = run_command([sys.executable, "-m", "tasks.commands.pull"], clone)
    assert result.stdout.startswith("dvc pull: pulled data/raw, models/candidate, models/production")
    assert result.stderr == ""
    repro = dvc(clone, "repro").stdout
    assert repro.count("didn't change, skipping") == 4 and "Running stage" not in repro


def test_make_run_is_quiet_about_an_empty_or_missing_remote(team: Team, tmp_path: Path) -> None:
    clone = team.clone(tmp_path / "fresh")
    (tmp_path / "empty-remote").mkdir()
    for remote in (tmp_path / "no-such-remote", tmp_path / "empty-remote"):
        dvc(clone, "remote", "modify", "--local", "team", "url", str(remote))
        result = run_command([sys.executable, "-m", "tasks.commands.pull"], clone)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        assert team_module.missing_outputs(clone) == ["data/raw", "models/candidate", "models/production"]


def test_teammates_push_during_a_run_is_kept(team: Team, tmp_path: Path) -> None:
    teammate_change(team, tmp_path / "teammate", "Promote above 0.52", "promote", min_accuracy=0.52)
    (run,) = trigger(team)
    wait_for_task(team, run, "git-sync")
    other = team.clone(tmp_path / "other")  # lands after the run fixed its starting commit
    (other / "NOTES.md").write_text("Team notes: nothing to do with the pipeline's outputs.\n")
    run_command(["git", "add", "NOTES.md"], other)
    run_command(["git", "commit", "-qm", "Team notes"], other)
    run_command(["git", "push", "-q", "origin", "main"], other)
    notes = run_command(["git", "rev-parse", "HEAD"], other).stdout.strip()
    (run,) = wait(team, [run])
    _completed(team, run)
    head = team.head()
    assert team.git("rev-parse", f"{head}~1") == notes  # rebased onto the teammate's commit, which is kept
    assert team.git("show", f"{head}:NOTES.md").startswith("Team notes")
    assert f"Run {run.name}:" in team.git("log", "-1", "--format=%s", head)
    logged(team, run.id, f"rebased onto {notes[:12]}")


def test_teammates_push_touching_the_runs_outputs_fails_the_run_and_keeps_the_remote(
        team: Team, tmp_path: Path) -> None:
    teammate_change(team, tmp_path / "teammate", "Promote above 0.53", "promote", min_accuracy=0.53)
    (run,) = trigger(team)
    wait_for_task(team, run, "git-sync")
    other = team.clone(tmp_path / "other")
    registry = other / "models" / "registry.json"
    registry.write_text(json.dumps(json.loads(registry.read_text()) + [{"action": "note", "by": "teammate"}]))
    run_command(["git", "commit", "-qam", "Hand-edited registry"], other)
    run_command(["git", "push", "-q", "origin", "main"], other)
    after_teammate = team.refs()
    (run,) = wait(team, [run])
    assert run.state_name == "Failed"
    assert "models/registry.json" in logged(team, run.id, "the branch moved during this run")
    assert team.refs() == after_teammate  # the git remote is as the teammate left it
