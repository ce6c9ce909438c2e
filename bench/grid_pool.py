"""A grid of experiments on the team's Prefect workers: one worker, then two, side by side in one run.

Sets up what a team has, in a scratch directory: a ``prefect server`` (SQLite), the ``process``
work pool, a bare git repository holding this checkout's HEAD (commit first: workers clone from
git) with a DVC remote of its own that already holds the MNIST data, and both deployments of
prefect.yaml (``prefect deploy --all``). Then, for 1 and for 2 workers: ``prefect worker start
--limit 1`` pinned to one core each (``taskset``) with one TensorFlow thread, and the grid through
them (``python -m flows.grid --pool``), from a fresh clone with the experiments of the previous
configuration removed from the remote (so both run every cell).

It prints, per configuration, the grid's wall time; per cell, the run's time and where it went
(from the run's log, PHASES below: the worker's process start, clone and flow import; checkout, DVC's
start and ``dvc pull``; the train stage, with training itself from DVCLive's ``train.seconds``; the
evaluate stage; ``dvc exp push``); then the speedup
(1 worker / 2 workers) and the overhead per cell (a cell's flow run minus its training), and from
those an estimate of the seed's 35-cell grid at 30000 steps on 1, 2, 8 and 35 workers.

    python bench/grid_pool.py [--steps 2000] [--seeds 2] [--rates 0.4 0.8] [--workers 1 2]
                              [--full-steps-per-second 600]
    python bench/grid_pool.py --workers 2 --seeds 5 --steps 0 --grid grids/seed-comparison.yaml
                              # the seed's whole comparison (params.yaml's 30000 steps) through two workers

``--full-steps-per-second``: the one-thread training speed at 30000 steps for the estimate (default:
the speed the cells measured). Real MNIST (the download stage's sources, verified by SHA-256).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.server import start_server  # noqa: E402
from tasks.lib.processes import child_environment, python_module, run  # noqa: E402

POOL, DEPLOYMENT = "mnist-pool", "grid-cell"
SEED_GRID_CELLS, SEED_GRID_STEPS = 35, 30000


def check(command: list[str], cwd: Path, environment: dict[str, str] | None = None, timeout: float = 1800) -> str:
    result = run(command, cwd, timeout=timeout, environment=environment)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def make_team_repository(scratch: Path) -> Path:
    """A bare git remote of HEAD whose committed default DVC remote (in ``scratch``) has the data."""
    seed = scratch / "seed"
    check(["git", "clone", "-q", str(ROOT), str(seed)], scratch)
    for key, value in (("user.email", "bench@example.invalid"), ("user.name", "bench")):
        check(["git", "config", key, value], seed)
    check(python_module("dvc", "remote", "add", "-d", "-f", "team", str(scratch / "dvc-remote")), seed)
    check(["git", "commit", "-qam", "bench: the team's DVC remote"], seed)
    print("bench: fetching MNIST for the team's DVC remote (dvc repro download, dvc push) ...", flush=True)
    check(python_module("dvc", "repro", "--single-item", "download"), seed)
    check(python_module("dvc", "push", "download"), seed)
    if check(["git", "status", "--porcelain", "--untracked-files=no"], seed).strip():  # a lock entry that changed
        check(["git", "commit", "-qam", "bench: the data's lock entry"], seed)
    check(["git", "clone", "-q", "--bare", str(seed), str(scratch / "remote.git")], scratch)
    return scratch / "remote.git"


def start_workers(count: int, scratch: Path, environment: dict[str, str]) -> list[subprocess.Popen]:
    workers = []
    for index in range(count):
        directory = scratch / f"worker-{count}-{index}"
        directory.mkdir()
        log = open(directory / "worker.log", "ab")  # noqa: SIM115 - the worker process owns it
        core = str(index % (os.cpu_count() or 1))
        command = ["taskset", "-c", core, *python_module("prefect", "worker", "start", "--pool", POOL,
                                                         "--name", f"bench-{count}-{index}", "--limit", "1")]
        logging = {"PREFECT_LOGGING_SETTINGS_PATH": str(ROOT / "flows" / "worker_logging.yml")}  # as docs/team.md
        workers.append(subprocess.Popen(command, cwd=directory, env=environment | logging, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True))
    return workers


def stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            os.killpg(worker.pid, 15)
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)


# A cell's log lines that start its phases, in order (the worker's process, then the flow run's).
MARKS = {"process": "Running 1 deployment pull step", "flow": "Beginning", "train": "Running stage 'train'",
         "evaluate": "Running stage 'evaluate'", "experiment": "Ran experiment(s)", "end": "Finished in state"}
# phase: (from mark, to mark)
PHASES = {"process start, clone, flow import": ("process", "flow"),
          "checkout, DVC start, dvc pull": ("flow", "train"), "train stage": ("train", "evaluate"),
          "evaluate stage": ("evaluate", "experiment"), "dvc exp push": ("experiment", "end")}


def _log_times(client: object, flow_run_id: object) -> dict[str, float]:
    """The time of the first log line of each of MARKS in the flow run's log."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    found = {}
    for entry in sorted(logs, key=lambda entry: entry.timestamp):
        for mark, text in MARKS.items():
            if mark not in found and text in entry.message:
                found[mark] = entry.timestamp.timestamp()
    return found


def cell_figures(server_url: str, clone: Path, commit: str, since: float) -> list[dict[str, float]]:
    """Per completed cell of this configuration: the seconds of each phase, the whole run (first to
    last log line) and its training (DVCLive's ``train.seconds``, from `dvc exp show`)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    shown = json.loads(check(python_module("dvc", "exp", "show", "--json", "--rev", commit), clone))
    training = {experiment["name"]: experiment["revs"][0]["data"]["metrics"]["reports/train/metrics.json"]["data"]
                for baseline in shown for experiment in baseline.get("experiments") or []}
    figures = []
    with temporary_settings(updates={PREFECT_API_URL: server_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT])))
        for flow_run in runs:
            name = flow_run.parameters.get("name")
            if flow_run.state_name != "Completed" or name not in training or flow_run.created.timestamp() < since:
                continue
            marks = _log_times(client, flow_run.id)
            if set(marks) != set(MARKS):
                continue
            cell = {"name": name, "run": marks["end"] - marks["process"], "training": training[name]["seconds"],
                    "steps_per_second": training[name]["steps_per_second"]}
            figures.append(cell | {phase: marks[to] - marks[start] for phase, (start, to) in PHASES.items()})
    return figures


def grid_arguments(arguments: argparse.Namespace) -> list[str]:
    steps = ["--steps", str(arguments.steps)] if arguments.steps else []  # 0: params.yaml's own
    sweep = ["--set", "train.learning_rate=" + ",".join(arguments.rates)]
    cells = ["--grid", str(arguments.grid)] if arguments.grid else sweep
    return steps + cells


def run_grid(workers: int, arguments: argparse.Namespace, scratch: Path, remote: Path,
             environment: dict[str, str], server_url: str) -> tuple[float, list[dict[str, float]]]:
    """The grid through ``workers`` workers, from a fresh clone; its wall time and its cells."""
    refs = check(["git", "--git-dir", str(remote), "for-each-ref", "--format=delete %(refname)", "refs/exps"], scratch)
    subprocess.run(["git", "--git-dir", str(remote), "update-ref", "--stdin"], input=refs, text=True, check=True)
    clone = scratch / f"clone-{workers}"
    check(["git", "clone", "-q", str(remote), str(clone)], scratch)
    commit = check(["git", "rev-parse", "HEAD"], clone).strip()
    pool = start_workers(workers, scratch, environment)
    try:
        command = python_module("flows.grid", "--pool", POOL, "--seeds", str(arguments.seeds),
                                *grid_arguments(arguments))
        print(f"bench: {workers} worker(s): {' '.join(command[1:])}", flush=True)
        since, started = time.time(), time.perf_counter()
        check(command, clone, environment, timeout=7200)
        wall = time.perf_counter() - started
    finally:
        stop(pool)
    table = clone / "reports" / "experiments" / "table.md"
    print(f"bench: the grid's table ({workers} worker(s)):\n{table.read_text()}", flush=True)
    return wall, cell_figures(server_url, clone, commit, since)


def report(workers: int, wall: float, cells: list[dict[str, float]]) -> None:
    print(f"\n{workers} worker(s): grid of {len(cells)} cells in {wall:.1f} s; seconds per cell:", flush=True)
    columns = [*PHASES, "run", "training", "overhead"]
    print("| cell | " + " | ".join(columns) + " |\n|" + " --- |" * (len(columns) + 1))
    for cell in sorted(cells, key=lambda cell: cell["name"]):
        values = [cell[column] for column in columns[:-1]] + [cell["run"] - cell["training"]]
        print(f"| {cell['name']} | " + " | ".join(f"{value:.1f}" for value in values) + " |")
    medians = [statistics.median(cell[column] for cell in cells) for column in columns[:-1]]
    medians.append(statistics.median(cell["run"] - cell["training"] for cell in cells))
    print("| median | " + " | ".join(f"{value:.1f}" for value in medians) + " |", flush=True)
    print("(the train stage's time beyond `training` is its process: TensorFlow's import, data, trace, save)")


def estimate(cells: list[dict[str, float]], wall: float, workers: int, steps_per_second: float | None) -> None:
    """The seed's 35-cell grid at 30000 steps on N workers: rounds of (overhead + training) + fixed."""
    overhead = statistics.median(cell["run"] - cell["training"] for cell in cells)
    speed = steps_per_second or statistics.median(cell["steps_per_second"] for cell in cells)
    per_cell = overhead + SEED_GRID_STEPS / speed
    fixed = max(wall - math.ceil(len(cells) / workers) * statistics.median(cell["run"] for cell in cells), 0.0)
    print(f"\nestimate, the seed's {SEED_GRID_CELLS} cells at {SEED_GRID_STEPS} steps ({speed:.0f} steps/s per "
          f"one-core worker, {overhead:.1f} s overhead per cell, {fixed:.0f} s for the grid itself):")
    for workers in (1, 2, 8, 35):
        minutes = (math.ceil(SEED_GRID_CELLS / workers) * per_cell + fixed) / 60
        print(f"  {workers:>2} workers: {minutes:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rates", nargs="+", default=["0.4", "0.8"])
    parser.add_argument("--grid", type=Path, default=None, help="a grid file instead of the --rates sweep")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="configurations, in order")
    parser.add_argument("--full-steps-per-second", type=float, default=None)
    arguments = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="grid-pool-bench-"))
    print(f"bench: machine {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; scratch {scratch}", flush=True)
    remote = make_team_repository(scratch)
    server = start_server(scratch / "prefect-home")
    environment = {k: v for k, v in child_environment().items() if not k.startswith("PREFECT_")}
    environment |= server.client_environment() | {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
                                                  "PREFECT_WORKER_QUERY_SECONDS": "1",
                                                  "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
    try:
        check(python_module("prefect", "--no-prompt", "work-pool", "create", POOL, "--type", "process"), scratch,
              environment)
        operator = scratch / "operator"
        check(["git", "clone", "-q", str(remote), str(operator)], scratch)
        check(python_module("prefect", "--no-prompt", "deploy", "--all"), operator,
              environment | {"MNIST_PIPELINE_GIT_URL": str(remote)})
        results = {workers: run_grid(workers, arguments, scratch, remote, environment, server.api_url)
                   for workers in arguments.workers}
    finally:
        server.stop()
    for workers, (wall, cells) in results.items():
        report(workers, wall, cells)
    if 1 in results and 2 in results:
        print(f"\nspeedup, 2 workers over 1: {results[1][0] / results[2][0]:.2f}x "
              f"(load average at the end {os.getloadavg()[0]:.2f})")
    last = max(results)
    estimate(results[last][1], results[last][0], last, arguments.full_steps_per_second)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
