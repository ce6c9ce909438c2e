"""The scheduled deployment of the pipeline flow: retrain and promote on a cron.

Cron, time zone, deployment name and collision strategy come from the ``schedule`` section
of params.yaml. At most one run of the deployment is active at a time (a deployment
concurrency limit of 1): with ``ENQUEUE`` a run that comes due while another is running
waits for it; with ``CANCEL_NEW`` it is cancelled. The deployment and its schedule live in
the Prefect server's database, and ``serve`` does not pause the schedule when it stops, so a
restarted serving process picks the same schedule up again (runs that came due meanwhile
start late).

Two ways to deploy the same flow:

* one machine (``make serve``): this module serves the deployment from this checkout;

      python -m flows.deploy [--repo .]                 # against PREFECT_API_URL
      python -m flows.deploy --start-server [--port 4200] [--home .prefect]
                                                        # also start a local server with its UI

* a team: ``prefect.yaml`` deploys it to a ``process`` work pool, its runs in team mode
  (``publish``), the code cloned from git by the worker for each run. Its build step is
  ``team_settings`` below, which reads params.yaml and the environment:

      MNIST_PIPELINE_GIT_URL=<git url> [MNIST_PIPELINE_GIT_BRANCH=main] prefect --no-prompt deploy --all
      PREFECT_LOGGING_SETTINGS_PATH=$PWD/flows/worker_logging.yml prefect worker start --pool mnist-pool

  (the workers' logging file: ``flows/worker_logging.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.grid_cell import CELL_FLOW
from flows.pipeline import pipeline
from flows.server import start_server
from tasks.lib import processes
from tasks.lib.files import read_text_file
from tasks.lib.params import ScheduleParams, load_params

ENTRYPOINT = "flows/pipeline.py:pipeline"
GIT_URL_VARIABLE, GIT_BRANCH_VARIABLE = "MNIST_PIPELINE_GIT_URL", "MNIST_PIPELINE_GIT_BRANCH"
# A run's process sends a heartbeat event every HEARTBEAT_SECONDS (Prefect's minimum, 30: prefect.yaml
# sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY in the run's environment); a run whose heartbeats stop for
# CRASH_AFTER_SECONDS is marked Crashed by the automation below, which releases its concurrency slot.
HEARTBEAT_SECONDS, CRASH_AFTER_SECONDS = 30, 45
CRASH_AUTOMATION = "mnist-pipeline: a run without heartbeats has crashed"  # the pipeline's runs and the grid's
FLOW_NAME = "mnist-pipeline"
_FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def build_deployment(schedule: ScheduleParams, repo: Path) -> RunnerDeployment:
    return pipeline.to_deployment(
        name=schedule.deployment_name,
        schedule=Cron(schedule.cron, timezone=schedule.timezone),
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy(schedule.collision_strategy)),
        parameters={"repo": str(repo)},
        description="Retrain, evaluate and promote the MNIST model through DVC on a schedule.",
        tags=["mnist", "dvc"],
    )


def _git_url() -> str:
    """The repository workers clone; a local path is made absolute (workers clone from elsewhere)."""
    url = os.environ.get(GIT_URL_VARIABLE, "").strip()
    if not url:
        raise ValueError(f"set {GIT_URL_VARIABLE} to the team's git repository, the one workers clone for each run "
                         f"(and {GIT_BRANCH_VARIABLE}, default main), then run `prefect deploy --all` again")
    is_local = not urlparse(url).scheme and not (":" in url and "@" in url.split(":", 1)[0])
    return str(Path(url).expanduser().resolve()) if is_local else url


def _check_prefect_file(prefect_file: Path, schedule: ScheduleParams) -> None:
    """prefect.yaml names its work pool and deployment literally (Prefect reads them before any
    build step runs), so they are checked against params.yaml here instead of read from it."""
    document = yaml.safe_load(read_text_file(prefect_file))
    for deployment in document.get("deployments") or []:
        pool = (deployment.get("work_pool") or {}).get("name")
        checks = [("work_pool.name", pool, schedule.work_pool)]  # every deployment: the grid's cells too
        if deployment.get("entrypoint") == ENTRYPOINT:
            checks.append(("name", deployment.get("name"), schedule.deployment_name))
        for key, found, expected in checks:
            if found != expected:
                setting = "deployment_name" if key == "name" else "work_pool"
                raise ValueError(f"{prefect_file}: deployment {key} is {found!r} but params.yaml schedule.{setting} "
                                 f"is {expected!r}; make them agree")


def crash_detection() -> object:
    """Prefect's "zombie flow run" automation, for this flow's runs: a proactive trigger that fires
    when a run that sent a heartbeat sends neither another one nor a final state within
    CRASH_AFTER_SECONDS, and marks it Crashed (Prefect then releases its deployment concurrency
    slot, so a queued run starts; without it the slot waits for its 300 s lease)."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    trigger = EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": [FLOW_NAME, CELL_FLOW]},
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in _FINAL_EVENTS)},
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=CRASH_AFTER_SECONDS))
    action = ChangeFlowRunState(state=StateType.CRASHED, message=(
        f"no heartbeat for {CRASH_AFTER_SECONDS} s: the flow-run process died (its worker was killed?)"))
    description = f"Marks a {FLOW_NAME} or {CELL_FLOW} flow run Crashed when its heartbeats stop (a killed worker)"
    return Automation(name=CRASH_AUTOMATION, description=description,
                      trigger=trigger, actions=[action])


def install_crash_detection() -> dict[str, str]:
    """prefect.yaml's second build step: create (or replace) the crash-detection automation on the
    server PREFECT_API_URL names."""
    from prefect.automations import Automation

    with contextlib.suppress(ValueError):  # ValueError: not there yet
        Automation.read(name=CRASH_AUTOMATION).delete()
    created = crash_detection().create()
    return {"automation": str(created.id)}


def team_settings(params_file: str = "params.yaml", prefect_file: str = "prefect.yaml") -> dict[str, str]:
    """prefect.yaml's build step (run by `prefect deploy`): the schedule from params.yaml and the
    git repository and branch the workers clone, from the environment. Checks that the branch exists."""
    schedule = load_params(Path(params_file).resolve()).schedule
    _check_prefect_file(Path(prefect_file), schedule)
    url, branch = _git_url(), os.environ.get(GIT_BRANCH_VARIABLE, "").strip() or "main"
    found = processes.run(["git", "ls-remote", "--heads", url, f"refs/heads/{branch}"])
    if found.returncode != 0 or not found.stdout.strip():
        detail = found.stderr.strip().splitlines()[-1:] if found.returncode else "no such branch"
        raise ValueError(f"{GIT_URL_VARIABLE}={url}: cannot clone branch {branch!r} ({detail})")
    return {"git_url": url, "git_branch": branch, "cron": schedule.cron, "timezone": schedule.timezone,
            "collision_strategy": schedule.collision_strategy, "heartbeat_seconds": str(HEARTBEAT_SECONDS)}


def serve_pipeline(repo: Path) -> None:
    """Register the deployment and run its flow runs in this process until interrupted."""
    schedule = load_params(repo / "params.yaml").schedule
    deployment = build_deployment(schedule, repo)
    print(f"deploy: serving 'mnist-pipeline/{schedule.deployment_name}' on cron '{schedule.cron}' "
          f"({schedule.timezone}), one run at a time ({schedule.collision_strategy})", flush=True)
    serve(deployment, pause_on_shutdown=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project directory")
    parser.add_argument("--start-server", action="store_true", help="start a local Prefect server (SQLite) first")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--home", type=Path, default=Path(".prefect"), help="PREFECT_HOME of the started server")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    load_params(repo / "params.yaml")  # bad params fail here, before a server starts
    server = None
    if args.start_server:
        print(f"deploy: starting the Prefect server (database in {args.home.resolve()}) ...", flush=True)
        server = start_server(args.home.resolve(), args.port, ui=True)
        os.environ["PREFECT_API_URL"] = server.api_url
        print(f"deploy: Prefect UI at {server.ui_url}  (API {server.api_url})", flush=True)
    try:
        if server:  # settings were read at import; this points this process at the new server
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                serve_pipeline(repo)
        else:
            serve_pipeline(repo)
    finally:
        if server:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
