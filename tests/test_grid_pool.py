"""A grid of experiments on the team's workers (flows/grid.py), against real parts: a `prefect
server` (SQLite here; tests/test_grid_pool_postgresql.py runs the same tests on PostgreSQL), two
`prefect worker` processes on the `process` pool running prefect.yaml's `grid-cell` deployment,
a bare git repository as the team's remote, a local-directory DVC remote, tiny synthetic data.

The tests run in file order on one team (module fixture):
a. a 2-variant × 2-seed grid on the pool: both workers run cells, the table is published; the
   table and every cell's metrics equal the local executor's (DVC's queue) for the same grid;
b. a worker SIGKILLed while it trains a cell: the run is marked Crashed, the cell runs again on the
   other worker, the grid completes, each cell recorded once;
c. the command of (a) again: no flow run is started, nothing trains;
d. a fresh clone sees every cell with `dvc exp pull` and `dvc exp show`;
e. a cell whose experiment was removed from the remote runs again, and only it.
(e, a bad grid file refused before anything runs, is tests/test_grid.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flows.server import start_server

from . import test_team
from .conftest import dvc, run_command, run_in_session, write_synthetic
from .test_team import POOL, Team, _make_remote, _wait_for
from .test_team_crash import alive, command_line, descendants

# Each test's time limit: a grid through the pool, or through DVC's queue, on a loaded 2-core machine.
pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(1800)]

SWEEP = ["--set", "train.learning_rate=0.05,0.1", "--seeds", "2", "--steps", "120"]  # 4 cells
KILLED_SWEEP = ["--set", "train.learning_rate=0.1", "--seeds", "2", "--steps", "3000"]  # 2 longer cells
NAMES = ["learning_rate-0.05-120steps-s0", "learning_rate-0.05-120steps-s1",
         "learning_rate-0.1-120steps-s0", "learning_rate-0.1-120steps-s1"]
KILLED_NAMES = ["learning_rate-0.1-3000steps-s0", "learning_rate-0.1-3000steps-s1"]
TABLE = Path("reports/experiments/table.md")


@dataclass
class GridTeam(Team):
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(self, name: str) -> subprocess.Popen:
        """`prefect worker start --limit 1`: one cell at a time, as on a one-core machine."""
        directory = self.root / name
        directory.mkdir(exist_ok=True)
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the worker process owns it
        command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name, "--limit", "1"]
        return subprocess.Popen(command, cwd=directory, env=self.worker_environment(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def make_team(root: Path, database_url: str | None) -> Iterator[GridTeam]:
    """A team with two one-run-at-a-time workers on the pool and both deployments of prefect.yaml."""
    source = root / "source"
    write_synthetic(source)
    server = start_server(root / "prefect-home", database_url=database_url)
    team = GridTeam(server, root, _make_remote(root, source, root / "dvc-remote"), root / "dvc-remote")
    try:
        team.prefect("work-pool", "create", POOL, "--type", "process")
        operator = team.clone(root / "operator")
        team.prefect("deploy", "--all", cwd=operator, extra={"MNIST_PIPELINE_GIT_URL": str(team.remote)})
        team.workers += [team.start_worker("worker-1"), team.start_worker("worker-2")]
        yield team
    finally:
        for worker in team.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        server.stop()


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GridTeam]:
    yield from make_team(tmp_path_factory.mktemp("grid-team"), None)


def grid(team: GridTeam, clone: Path, *arguments: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:  # noqa: E501
    command = [sys.executable, "-m", "tasks.commands.experiments", "--pool", POOL, *arguments]
    if not wait:
        return subprocess.Popen(command, cwd=clone, env=team.environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return run_in_session(command, clone, team.environment(), timeout=900)


def cell_runs(team: GridTeam) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    return test_team.prefect_api(team.server, lambda client: client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["grid-cell"])),
        flow_run_filter=FlowRunFilter()))


def grid_commit(clone: Path) -> str:
    """The commit a grid of ``clone`` runs from: HEAD, or, after commits that only publish a
    table (flows/grid.py), the commit before them."""
    return run_command(["git", "log", "-1", "--format=%H", "--invert-grep", "--grep=^Grid of"], clone).stdout.strip()


def remote_cells(team: GridTeam, commit: str) -> list[str]:
    """The experiment refs of ``commit`` on the team's git remote (DVC: refs/exps/ab/cdef…/<name>)."""
    refs = [name for name in team.refs() if name.startswith(f"refs/exps/{commit[:2]}/{commit[2:]}/")]
    return sorted(ref.rsplit("/", 1)[1] for ref in refs)


def accuracies(clone: Path) -> dict[str, tuple]:
    """Each experiment of HEAD in ``clone``: its test accuracies (EMA and raw), from `dvc exp show`."""
    shown = json.loads(dvc(clone, "exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            revision = experiment["revs"][0]
            test = revision["data"]["metrics"]["reports/metrics.json"]["data"]["test"]
            found[experiment["name"]] = (test["accuracy"], test["accuracy_raw"])
    return found


def table_rows(table: Path) -> list[list[str]]:
    """table.md's rows without the steps/s column (a speed, which depends on the machine's load)."""
    rows = [line.split("|")[1:-2] for line in table.read_text().splitlines() if line.startswith("| ")]
    return rows


def test_a_grid_runs_on_both_workers_and_publishes_its_table(team: GridTeam, tmp_path: Path) -> None:
    pool_clone = team.clone(tmp_path / "pool")
    result = grid(team, pool_clone, *SWEEP, "--publish")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [run for run in cell_runs(team) if run.state_name == "Completed"]
    assert len(runs) == 4
    ran_by = {name: (team.root / f"{name}.log").read_text() for name in ("worker-1", "worker-2")}
    for name, log in ran_by.items():  # each worker started at least one of the cells
        assert any(str(run.id) in log for run in runs), f"{name} ran no cell:\n{log[-2000:]}"
    commit = grid_commit(pool_clone)
    assert run_command(["git", "rev-parse", "HEAD~1"], pool_clone).stdout.strip() == commit  # one table commit
    assert remote_cells(team, commit) == NAMES
    published = run_command(["git", "show", "--stat", "--format=%s", "origin/main"], pool_clone).stdout
    assert "reports/experiments/table.md" in published and "accuracy.png" in published


def test_a_the_local_executor_gives_the_same_table_and_metrics(team: GridTeam, tmp_path: Path) -> None:
    """The same grid through DVC's queue on this machine: every accuracy figure is the pool's."""
    pool_clone = team.clone(tmp_path / "pool")  # at the table commit the grid of the test before pushed
    pool_table, commit = table_rows(pool_clone / TABLE), grid_commit(pool_clone)
    run_command(["git", "checkout", "-q", commit], pool_clone)
    dvc(pool_clone, "exp", "pull", "--no-cache", "origin", *NAMES)
    local_clone = team.clone(tmp_path / "local")
    run_command(["git", "checkout", "-q", commit], local_clone)
    local = run_in_session([sys.executable, "-m", "tasks.commands.experiments", *SWEEP], local_clone,
                           team.environment(), timeout=1200)
    assert local.returncode == 0, local.stdout + local.stderr
    assert accuracies(pool_clone) == accuracies(local_clone) and len(accuracies(local_clone)) == 4
    assert pool_table == table_rows(local_clone / TABLE) and len(pool_table) == 4  # header, rule, 2 variants


def test_b_a_killed_worker_s_cell_runs_again_and_the_grid_completes(team: GridTeam, tmp_path: Path) -> None:
    clone = team.clone(tmp_path / "clone")
    before = {run.id for run in cell_runs(team)}
    running = grid(team, clone, *KILLED_SWEEP, wait=False)

    def training() -> tuple[int, subprocess.Popen] | None:
        for index, worker in enumerate(team.workers):
            if any("-m tasks.train" in command_line(pid) for pid in descendants(worker.pid)):
                return index, worker
        assert running.poll() is None, running.stdout.read()
        return None

    index, victim = _wait_for(training, 300, "a worker training a cell")
    children = descendants(victim.pid)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker, its flow-run process and what they started
    victim.wait()
    output, _ = running.communicate(timeout=600)
    assert running.returncode == 0, output
    assert "running it again on a live worker, attempt 2 of 3" in output
    assert not any(alive(pid) for pid in children)
    assert remote_cells(team, grid_commit(clone)) == sorted(NAMES + KILLED_NAMES)  # each cell once
    new = [run for run in cell_runs(team) if run.id not in before]
    assert sorted(run.state_name for run in new) == ["Completed", "Completed", "Crashed"]
    team.workers[index] = team.start_worker(f"worker-{index + 1}")  # two workers again


def test_c_the_same_command_again_trains_nothing(team: GridTeam, tmp_path: Path) -> None:
    clone = team.clone(tmp_path / "again")  # at the table commit of (a): the grid's commit is the one before
    before, committed = len(cell_runs(team)), table_rows(clone / TABLE)
    started = time.monotonic()
    result = grid(team, clone, *SWEEP)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 already on the remotes (not run again), 0 to the pool" in result.stdout + result.stderr
    assert len(cell_runs(team)) == before
    assert table_rows(clone / TABLE) == committed  # the table, written again from the experiments
    print(f"a grid already on the remotes: {time.monotonic() - started:.1f} s")


def test_d_a_fresh_clone_sees_every_cell_with_dvc_exp_pull_and_show(team: GridTeam, tmp_path: Path) -> None:
    clone = team.clone(tmp_path / "fresh")
    commit = grid_commit(clone)
    run_command(["git", "checkout", "-q", commit], clone)
    dvc(clone, "exp", "pull", "origin", *NAMES)
    shown = accuracies(clone)
    assert sorted(shown) == NAMES
    assert all(0.5 < ema <= 1 for ema, _raw in shown.values())
    # A cell's model, through a branch of the experiment (`dvc exp apply` stops at models/production,
    # an output of promote, which experiments never run: DVC's checkout fails on an output without a hash).
    dvc(clone, "exp", "branch", NAMES[-1], "best-cell")
    run_command(["git", "checkout", "-q", "best-cell"], clone)
    dvc(clone, "pull", "download", "train")
    assert (clone / "models" / "candidate").is_dir()
    assert dvc(clone, "status", "train").stdout.strip() == "Data and pipelines are up to date."  # its model


def test_e_a_cell_removed_from_the_remote_runs_again_and_only_it(team: GridTeam, tmp_path: Path) -> None:
    clone = team.clone(tmp_path / "removed")
    commit = grid_commit(clone)
    team.git("update-ref", "-d", f"refs/exps/{commit[:2]}/{commit[2:]}/{NAMES[0]}")  # `dvc exp remove -g origin`
    before = {run.id for run in cell_runs(team)}
    result = grid(team, clone, *SWEEP)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 already on the remotes (not run again), 1 to the pool" in result.stdout + result.stderr
    # its first run's idempotency key finds the old run, whose experiment is gone: attempt 2 runs it
    assert "Completed, but its experiment is not on the remote" in result.stdout + result.stderr
    new = [run for run in cell_runs(team) if run.id not in before]
    assert [(run.parameters["name"], run.state_name) for run in new] == [(NAMES[0], "Completed")]
    assert remote_cells(team, commit) == sorted(NAMES + KILLED_NAMES)
