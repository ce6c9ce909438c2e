"""One cell of a grid of experiments, on a worker: the child flow of ``flows/grid.py``.

prefect.yaml's ``grid-cell`` deployment runs it on the team's work pool, in a clone of the team's
branch (its pull step); the parent sends one run per cell with the grid's commit, the cell's
experiment name and its ``-S`` overrides. The run checks the clone out at that commit (not the
branch's newest), runs the cell as a DVC experiment up to ``evaluate`` (``--pull``: the data from
the DVC remote) (experiments never publish to production) and sends it back with
``dvc exp push origin``. A cell already on the git remote is not run again; a run that diverged
ends Completed, named "Diverged", its message the train stage's stop record.

Its imports are few on purpose: a worker starts a fresh process for every cell.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from flows.pipeline import StageFailed, sweep_dead_runs
from tasks.lib import repository as team
from tasks.lib.divergence import read_record
from tasks.lib.params import load_params

CELL_FLOW = "mnist-grid-cell"
DIVERGED = "Diverged"


def _experiment_timeout(root: Path) -> float:
    limits = load_params(root / "params.yaml").schedule.stage_timeout_seconds
    return float(limits["download"] + limits["train"] + limits["evaluate"])


@flow(name=CELL_FLOW, log_prints=True, persist_result=False)
def grid_cell(commit: str, name: str, settings: list[str], repo: str = ".") -> State:
    """Run one cell as DVC experiment ``name`` of ``commit`` (``settings``: its `-S` overrides)
    and push it to the team's remotes; a run that diverged ends Completed, named "Diverged"."""
    root, log = Path(repo).resolve(), get_run_logger()
    sweep_dead_runs(root)
    team.checkout_commit(root, commit)
    team.ensure_identity(root)  # `dvc exp run` commits the experiment
    if name in team.remote_experiments(root, commit):
        return Completed(message=f"{name} is already on the remotes; nothing to run")
    # --pull: what an unchanged stage (download) recorded comes from the DVC remote, in the same
    # DVC process (a separate `dvc pull` would start DVC once more per cell)
    overrides = [part for setting in settings for part in ("-S", setting)]
    arguments = ["exp", "run", "--pull", "evaluate", "--name", name, *overrides]
    code, lines = team.dvc_stream(root, arguments, _experiment_timeout(root), log.info)
    if code != 0:
        if record := read_record("\n".join(lines)):
            return Completed(name=DIVERGED, message=record.record_line())
        raise StageFailed(f"`dvc {' '.join(arguments)}` failed with exit code {code}:\n" + "\n".join(lines[-15:]))
    pushed = team.dvc(root, "exp", "push", team.REMOTE, name, timeout=_experiment_timeout(root))
    if pushed.returncode != 0 and name not in team.remote_experiments(root, commit):
        raise StageFailed(f"`dvc exp push {team.REMOTE} {name}` failed:\n{pushed.stderr.strip()}")
    return Completed(message=f"pushed experiment {name} of {commit[:12]}")
