"""flows/server.py: a team's Prefect server on PostgreSQL runs the pipeline flow, and its runs are in
that database (SQLite stays the one-machine default, which every other server test uses)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flows.server import start_server

from . import postgresql
from .conftest import make_params_document, make_project, run_command, tool_environment

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(not postgresql.available(), reason="PostgreSQL's server is not installed "
                                                                     "(apt-get install postgresql)")]


def test_a_server_on_postgresql_records_a_flow_run(tmp_path: Path, synthetic_source: Path) -> None:
    project = make_project(tmp_path / "project", make_params_document(synthetic_source))
    with postgresql.cluster() as url:
        server = start_server(tmp_path / "prefect-home", database_url=url)
        try:
            environment = tool_environment() | server.client_environment()
            run_command([sys.executable, "-m", "flows.pipeline"], project, environment=environment)  # exit 0
            states = postgresql.query(url, "select string_agg(state_type::text, ',') from flow_run")
            assert states == "COMPLETED"
            tasks = postgresql.query(url, "select count(*) from task_run where state_type = 'COMPLETED'")
            assert int(tasks) == 4  # the four stages
        finally:
            server.stop()
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()  # nothing went to SQLite
