"""The scheduled deployment of the pipeline flow: retrain and promote on a cron.

Cron, time zone, deployment name and collision strategy come from the ``schedule`` section
of params.yaml. At most one run of the deployment is active at a time (a deployment
concurrency limit of 1): with ``ENQUEUE`` a run that comes due while another is running
waits for it; with ``CANCEL_NEW`` it is cancelled. The deployment and its schedule live in
the Prefect server's database, and ``serve`` does not pause the schedule when it stops, so a
restarted serving process picks the same schedule up again (runs that came due meanwhile
start late).

    python -m flows.deploy [--repo .]                 # against PREFECT_API_URL
    python -m flows.deploy --start-server [--port 4200] [--home .prefect]
                                                      # also start a local server with its UI
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.pipeline import pipeline
from flows.server import start_server
from tasks.params import ScheduleParams, load_params


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
