"""The grid on the team's workers (tests/test_grid_pool.py, 6a–6d) against a Prefect server backed
by a real PostgreSQL, as a team runs it: a grid writes many flow runs at once. The tests are
test_grid_pool.py's; only the team's server differs (tests/postgresql.py: Debian's PostgreSQL,
started and stopped here)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import postgresql
from .test_grid_pool import (  # noqa: F401 - collected here, on this module's team
    GridTeam,
    make_team,
    test_a_grid_runs_on_both_workers_and_publishes_its_table,
    test_a_the_local_executor_gives_the_same_table_and_metrics,
    test_b_a_killed_worker_s_cell_runs_again_and_the_grid_completes,
    test_c_the_same_command_again_trains_nothing,
    test_d_a_fresh_clone_sees_every_cell_with_dvc_exp_pull_and_show,
    test_e_a_cell_removed_from_the_remote_runs_again_and_only_it,
)

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.skipif(not postgresql.available(), reason="PostgreSQL's server is not installed "
                                                                     "(apt-get install postgresql)")]


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GridTeam]:
    with postgresql.cluster() as url:
        yield from make_team(tmp_path_factory.mktemp("grid-team-postgresql"), url)
