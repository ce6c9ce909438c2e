"""A grid of experiments on the team's Prefect workers: one child flow run per cell, results in git and DVC.

The same grid as the local executor (``tasks/commands/experiments.py``: the seed's comparison,
another grid file or ``--set`` sweeps, × seeds), run elsewhere:

    python -m flows.grid --pool mnist-pool --seeds 5 [--steps N] [--grid FILE | --set KEY=V1,V2 ...]
                         [--only VARIANT ...] [--attempts 3] [--publish]
    python -m tasks.commands.experiments --pool mnist-pool ...      # the same
    make experiments SEEDS=5 POOL=mnist-pool

* The parent flow run (``grid``, in this process, on the server ``PREFECT_API_URL`` names) runs
  from this checkout's commit, which must be on the team's git remote. It sends one run of the
  ``grid-cell`` deployment (prefect.yaml, the same work pool as the nightly retrain) per cell.
* A child (``flows/grid_cell.py``, on a worker) checks its clone out at that commit (not the branch's
  newest), pulls the data from the DVC remote, runs the cell as a DVC experiment up to
  ``evaluate`` (experiments never publish to production) and sends it back with
  ``dvc exp push origin``: any clone can then ``dvc exp pull``, ``dvc exp show`` and ``dvc exp branch`` it.
* The parent pulls the experiments and writes the same ``table.md`` and ``accuracy.png`` as the
  local executor; with ``--publish`` it commits the two on the branch and pushes them.

Exactly once, resumable: a cell whose experiment is already on the git remote for this commit is
not run again, and each run of a cell has an idempotency key (commit, cell, attempt), so calling
the command again finds the runs of the last call instead of starting new ones. A run that ends
without a result (its worker was killed: Prefect marks it Crashed when its heartbeats stop;
failed; cancelled) is run again, at most ``--attempts`` runs per cell in all. A diverged cell is
final: its run ends Completed, named "Diverged", with the train stage's stop record.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.grid_cell import CELL_FLOW, DIVERGED
from tasks.commands import experiments as local
from tasks.lib import repository as team
from tasks.lib.divergence import read_record
from tasks.lib.grid import Cell, GridError, cells, read_grid, sweep

GRID_FLOW = "mnist-grid"
CELL_DEPLOYMENT = f"{CELL_FLOW}/grid-cell"
POLL_SECONDS = 2.0


# --- the parent: the grid --------------------------------------------------------------------


@dataclass
class CellRun:
    """The current run of one cell, and how it ended."""

    cell: Cell
    attempt: int = 0
    run_id: UUID | None = None
    result: str | None = None  # done | diverged | failed
    detail: str = ""  # the stop record of a diverged cell, or where to read why it failed


def _submit(cell_run: CellRun, commit: str) -> None:
    from prefect.deployments import run_deployment

    cell_run.attempt += 1
    cell = cell_run.cell
    flow_run = run_deployment(CELL_DEPLOYMENT, timeout=0, tags=["grid", f"grid-{commit[:12]}"],
                              parameters={"commit": commit, "name": cell.name, "settings": cell.settings},
                              flow_run_name=f"{cell.name}-{commit[:8]}-{cell_run.attempt}",
                              idempotency_key=f"{commit}/{cell.name}/{cell_run.attempt}")
    cell_run.run_id = flow_run.id


def _outcome(state: object, name: str, commit: str) -> tuple[str, str] | None:
    """(result, detail) of a cell's finished run, or None when it brought no result: it did not
    complete, or it completed but its experiment is not on the git remote (removed since, say,
    while the run's idempotency key still finds that old run)."""
    if state.is_completed() and state.name == DIVERGED:
        return "diverged", state.message or ""
    if state.is_completed() and name in team.remote_experiments(Path.cwd(), commit):
        return "done", ""
    return None


def _settle(cell_run: CellRun, flow_run: object, attempts: int, commit: str) -> None:
    """Record how a cell's run ended, or send the cell again when the run brought no result."""
    log, state = get_run_logger(), flow_run.state
    name = cell_run.cell.name
    if outcome := _outcome(state, name, commit):
        cell_run.result, cell_run.detail = outcome
        log.info("grid: %s %s (flow run %s)", name, "diverged: final" if outcome[0] == "diverged" else "done",
                 flow_run.name)
        return
    why = state.name if not state.is_completed() else "Completed, but its experiment is not on the remote"
    if cell_run.attempt < attempts:
        log.warning("grid: %s: flow run %s ended %s (%s); running it again on a live worker, attempt %d of %d",
                    name, flow_run.name, why, (state.message or "").strip()[:200], cell_run.attempt + 1, attempts)
        _submit(cell_run, commit)
    else:
        cell_run.result, cell_run.detail = "failed", f"flow runs of {name} in the Prefect UI"
        log.error("grid: %s: gave up after %d runs; the last, %s, ended %s", name, attempts, flow_run.name, why)


@task(name="run-cells", persist_result=False)
def run_cells(commit: str, pending: list[Cell], attempts: int) -> list[CellRun]:
    """Send every pending cell to the pool and follow the runs until each cell has its result."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cell_runs = [CellRun(cell) for cell in pending]
    for cell_run in cell_runs:
        _submit(cell_run, commit)
    with get_client(sync_client=True) as client:
        while waiting := {cell_run.run_id: cell_run for cell_run in cell_runs if cell_run.result is None}:
            running = FlowRunFilter(id=FlowRunFilterId(any_=list(waiting)))
            for flow_run in client.read_flow_runs(flow_run_filter=running):
                if flow_run.state is not None and flow_run.state.is_final():
                    _settle(waiting[flow_run.id], flow_run, attempts, commit)
            time.sleep(POLL_SECONDS)
    return cell_runs


def pool_experiments(points: list[Cell], cell_runs: list[CellRun], commit: str) -> dict[str, local.Experiment]:
    """What `dvc exp show` lists for ``commit`` after pulling the grid's experiments from the git
    remote (metrics only: ``--no-cache``), and the cells the pool ran without an experiment
    (diverged, failed), as the local report reads them."""
    names = sorted({point.name for point in points} & team.remote_experiments(Path.cwd(), commit))
    if names:
        local.dvc("exp", "pull", "--no-cache", team.REMOTE, *names, capture=True)
    found = local.read_experiments(commit)
    for cell_run in cell_runs:
        if cell_run.result == "diverged":
            record = read_record(cell_run.detail)
            found[cell_run.cell.name] = local.Experiment(cell_run.cell.name, "failed", {}, {},
                                                         diverged_step=record.step if record else 0)
        elif cell_run.result == "failed":
            found[cell_run.cell.name] = local.Experiment(cell_run.cell.name, "failed", {}, {},
                                                         failure=cell_run.detail)
    return found


@task(name="publish-table", persist_result=False)
def publish_table(start: team.RunStart, output: Path, message: str) -> str | None:
    """One commit of table.md and accuracy.png on the branch, pushed as team-mode runs push."""
    paths = [str(output / local.TABLE_FILE), str(output / local.FIGURE_FILE)]
    publication = team.publish_results(Path.cwd(), start, message, paths=paths)
    get_run_logger().info("grid: %s", f"pushed {publication.commit[:12]} to {publication.branch}"
                          if publication.commit else "the table did not change; nothing pushed")
    return publication.commit


def grid_commit(repo: Path, head: str, output: Path) -> str:
    """The commit whose experiments the grid runs: ``head``, or, when ``head`` only publishes a
    table (a grid's ``--publish`` commit: files under ``output`` alone), the commit before it: a
    table changes no input, so the grid that made it can be resumed from the branch's tip."""
    commit = head
    while len(parents := team.git(repo, "rev-list", "--parents", "-n", "1", commit).split()[1:]) == 1:
        changed = team.git(repo, "diff", "--name-only", parents[0], commit).splitlines()
        if not changed or not all(Path(path).is_relative_to(output) for path in changed):
            break
        commit = parents[0]
    return commit


@flow(name=GRID_FLOW, log_prints=True, persist_result=False)
def grid(points: list[Cell], attempts: int = 3, output: str = str(local.DEFAULT_OUTPUT),
         publish: bool = False) -> dict[str, int]:
    """Run every cell of ``points`` not yet on the remotes on the pool; write (and publish) the table."""
    started, log = time.perf_counter(), get_run_logger()
    start = team.pushed_commit(Path.cwd())
    commit = grid_commit(Path.cwd(), start.commit, Path(output))
    on_remote = team.remote_experiments(Path.cwd(), commit)
    pending = [point for point in points if point.name not in on_remote]
    log.info("grid: %d cells from %s at %s; %d already on the remotes (not run again), %d to the pool",
             len(points), start.branch, commit[:12], len(points) - len(pending), len(pending))
    cell_runs = run_cells(commit, pending, attempts) if pending else []
    found = pool_experiments(points, cell_runs, commit)
    rows = local.write_report(points, found, Path(output), time.perf_counter() - started)
    create_markdown_artifact(markdown=(Path(output) / local.TABLE_FILE).read_text(), key="grid-table",
                             description=f"The grid's table, experiments of {commit[:12]}")
    if publish:
        publish_table(start, Path(output), f"Grid of {len(points)} experiments of {commit[:12]}: table and figure")
    counts = {"cells": len(points), "ran": sum(cell_run.result == "done" for cell_run in cell_runs),
              "runs": sum(cell_run.attempt for cell_run in cell_runs)}
    counts["unfinished"] = sum(len(row.outcomes) - len(row.finished) - len(row.diverged) for row in rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    args = local.parse_arguments(argv)
    if not args.pool:
        print("error: flows.grid runs a grid on a work pool: give --pool (without it: tasks.commands.experiments)",
              file=sys.stderr)
        return 2
    if not os.environ.get("PREFECT_API_URL"):
        print("error: --pool needs the team's Prefect server, where the workers are: set PREFECT_API_URL",
              file=sys.stderr)
        return 2
    try:
        points = cells(sweep(args.sets) if args.sets else read_grid(args.grid), args.seeds, args.steps, args.only)
        check_deployment(args.pool)
        state = grid(points, args.attempts, str(args.output), args.publish, return_state=True)
    except (GridError, team.TeamError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grid: interrupted; the cells already sent run on; the same command again waits for them "
              "and writes the table", file=sys.stderr)
        return 130
    if not state.is_completed():
        print(f"error: the grid flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    counts = state.result()
    print(f"grid: {counts['cells']} cells, {counts['ran']} run on the pool in {counts['runs']} flow runs",
          flush=True)
    return 1 if counts["unfinished"] else 0


def check_deployment(pool: str) -> None:
    """The cell deployment exists on the server and runs on ``pool``; else say how to deploy it."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(CELL_DEPLOYMENT)
        except ObjectNotFound:
            raise team.TeamError(f"no deployment {CELL_DEPLOYMENT} on {os.environ['PREFECT_API_URL']}: deploy "
                                 "prefect.yaml (`prefect --no-prompt deploy --all`, docs/team.md)") from None
    if deployment.work_pool_name != pool:
        raise team.TeamError(f"{CELL_DEPLOYMENT} runs on work pool {deployment.work_pool_name!r}, not {pool!r}")


if __name__ == "__main__":
    sys.exit(main())
