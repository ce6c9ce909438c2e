"""A grid of DVC experiments over several seeds; by default the seed's comparison (each optimisation dropped).

Not a pipeline stage: a driver for `dvc exp`. For every variant and every seed (`train.seed`
0..S-1) it queues one experiment up to the `evaluate` stage (experiments never publish to
production), named `<variant>-s<seed>` (`<variant>-<N>steps-s<seed>` with --steps), runs the
queue one at a time (two cores: parallel runs would only slow each other down), and writes the
table (`tasks.lib.comparison`) from `dvc exp show` to stdout, `<output>/table.md` and
`<output>/accuracy.png`. The experiments stay in DVC: `dvc exp show`, `dvc exp diff`, `dvc exp apply`.

    python -m tasks.commands.experiments --seeds 5 [--steps N] [--grid FILE | --set KEY=V1,V2 ...]
                                         [--only VARIANT ...] [--report-only [--rev COMMIT]]
                                         [--pool WORK_POOL [--attempts 3] [--publish]]
    make experiments SEEDS=5 [STEPS=N] [POOL=mnist-pool]

With ``--pool`` the same grid runs on the team's Prefect workers instead (``flows/grid.py``).

The grid is data (``tasks/lib/grid.py``): ``grids/seed-comparison.yaml`` by default, another file
with ``--grid``, or a sweep with ``--set train.learning_rate=0.2,0.4,0.8`` (several ``--set``: their
product). Every override is checked against the params model before anything runs.

Calling it again resumes the grid (experiments of the current commit, as `dvc exp show` lists them):
- finished experiments are kept, queued ones are not queued again, running ones are waited for;
- a run stopped by the divergence guard is final (the same params and seed diverge again);
- any other failed run (a crash, a killed worker) is removed from the queue and run again, and
  so is a "running" one whose process is gone (the machine restarted): `dvc queue kill` marks it
  failed first, otherwise `dvc exp run --run-all` would wait for it forever.
Ctrl-C stops following the logs; DVC's queue worker keeps running the queue in the background
(`dvc queue status`, `dvc queue stop`); call this again to wait for it and write the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.lib import repository
from tasks.lib.atomic import write_bytes_atomic
from tasks.lib.comparison import Outcome, Row, accuracy_figure, markdown_table
from tasks.lib.divergence import read_record
from tasks.lib.files import FileProblem, read_regular_file
from tasks.lib.grid import DEFAULT_GRID, Cell, GridError, cells, read_grid, sweep

DEFAULT_OUTPUT = Path("reports/experiments")
TABLE_FILE, FIGURE_FILE = "table.md", "accuracy.png"
LOG_MAX_BYTES = 64 << 20  # a run's log is a few KB; cap what is read of a damaged one


def dvc(*arguments: str, capture: bool = False) -> str:
    """`dvc <arguments>` here, its output shown (or, with ``capture``, returned); exit on failure."""
    result = repository.dvc(Path.cwd(), *arguments, timeout=None, capture=capture)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] if capture else []
        raise SystemExit(f"error: `dvc {' '.join(arguments)}` failed with exit code {result.returncode} "
                         f"{' '.join(detail)}".rstrip())
    return result.stdout if capture else ""


# --- what `dvc exp show --json` says ---------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    name: str
    state: str  # success | running | queued | failed
    metrics: dict
    params: dict
    timestamp: str | None = None
    log: str | None = None  # the run's output file (queue runs)
    pid: int | None = None  # the running experiment's process
    diverged_step: int | None = None  # a pool cell stopped by the divergence guard (flows/grid.py)
    failure: str | None = None  # where to look for why a failed run failed, when not its queue log


_PRIORITY = {"success": 0, "running": 1, "queued": 2, "failed": 3}


def _experiment(entry: dict) -> Experiment | None:
    revision = (entry.get("revs") or [{}])[0]
    name = entry.get("name") or revision.get("name")
    if not name:
        return None
    executor = entry.get("executor") or {}
    local = executor.get("local") or {}
    data = revision.get("data") or {}
    metrics = (data.get("metrics") or {}).get("reports/metrics.json", {}).get("data") or {}
    state = executor.get("state") or "success"
    if state == "success" and (revision.get("error") or not metrics):
        state = "failed"  # a failed run shows its baseline's metrics or none: never report them
    return Experiment(name=name, state=state, metrics=metrics if state == "success" else {},
                      params=(data.get("params") or {}).get("params.yaml", {}).get("data") or {},
                      timestamp=data.get("timestamp"), log=local.get("log"), pid=local.get("pid"))


def experiments_from_exp_show(exp_show: list[dict]) -> dict[str, Experiment]:
    """Each named experiment of the listed commits; of several with one name, the most final."""
    found: dict[str, Experiment] = {}
    for commit in exp_show:
        for entry in commit.get("experiments") or []:
            experiment = _experiment(entry)
            if experiment is None:
                continue
            known = found.get(experiment.name)
            if known is None or _PRIORITY[experiment.state] < _PRIORITY[known.state]:
                found[experiment.name] = experiment
    return found


def read_experiments(revision: str = "HEAD") -> dict[str, Experiment]:
    """The experiments whose baseline is this commit (DVC's own default: HEAD)."""
    return experiments_from_exp_show(json.loads(dvc("exp", "show", "--json", "--rev", revision, capture=True)))


def diverged_at(experiment: Experiment) -> int | None:
    """The step at which the divergence guard stopped this failed run, if it did."""
    if experiment.state != "failed":
        return None
    if experiment.diverged_step is not None or not experiment.log:
        return experiment.diverged_step
    try:  # the train stage's stop record, in the log DVC keeps of a failed queued run
        record = read_record(read_regular_file(Path(experiment.log), LOG_MAX_BYTES).decode(errors="replace"))
    except (OSError, FileProblem):
        return None
    return record.step if record else None


def _process_gone(pid: int | None) -> bool:
    if pid is None:  # not started yet: DVC's worker is about to start it
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# --- resuming -------------------------------------------------------------------------------


def _setting(params: dict, override: str) -> tuple[str, object, object]:
    key, value = override.split("=", 1)
    section, field = key.split(".")
    return key, yaml.safe_load(value), params.get(section, {}).get(field)  # as `dvc exp run -S` parses it


def check_params(planned: Cell, experiment: Experiment) -> None:
    """An experiment found under a grid name must have been run with that grid point's params."""
    if not experiment.params:  # DVC could not read them (a run that failed early): nothing to compare
        return
    for override in planned.settings:
        key, wanted, found = _setting(experiment.params, override)
        if found != wanted:
            raise SystemExit(f"error: experiment {planned.name} ran with {key}={found}, not {wanted}; "
                             f"remove it (`dvc exp remove {planned.name}`) or commit, then run again")


def plan(points: list[Cell], experiments: dict[str, Experiment]) -> dict[str, list[Cell]]:
    """Sort the grid: keep (done, diverged, queued, running), rerun (failed, orphaned), queue (new)."""
    actions: dict[str, list[Cell]] = {key: [] for key in
                                         ("done", "diverged", "queued", "running", "failed", "orphaned", "new")}
    for point in points:
        experiment = experiments.get(point.name)
        if experiment is None:
            actions["new"].append(point)
            continue
        check_params(point, experiment)
        if experiment.state == "failed":
            actions["diverged" if diverged_at(experiment) is not None else "failed"].append(point)
        elif experiment.state == "running" and _process_gone(experiment.pid):
            actions["orphaned"].append(point)
        else:
            actions[{"success": "done"}.get(experiment.state, experiment.state)].append(point)
    return actions


def queue(point: Cell) -> None:
    settings = [argument for override in point.settings for argument in ("-S", override)]
    print(f"experiments: queueing {point.name} {' '.join(point.settings)}", flush=True)
    dvc("exp", "run", "--queue", "evaluate", "--name", point.name, *settings, "--quiet")


def prepare(actions: dict[str, list[Cell]]) -> list[Cell]:
    """Clear orphaned and failed runs from DVC's queue and queue them with the new points."""
    counts = ", ".join(f"{len(points)} {key}" for key, points in actions.items() if points)
    print(f"experiments: {counts}", flush=True)
    for point in actions["orphaned"]:
        print(f"experiments: {point.name} shows as running but its process is gone; marking it failed", flush=True)
        dvc("queue", "kill", point.name, capture=True)
    to_queue = actions["orphaned"] + actions["failed"] + actions["new"]
    for point in actions["orphaned"] + actions["failed"]:
        print(f"experiments: {point.name} failed before; running it again", flush=True)
        dvc("queue", "remove", point.name, capture=True)
    for point in to_queue:
        queue(point)
    return to_queue


# --- the report -----------------------------------------------------------------------------


def outcome(point: Cell, experiment: Experiment | None) -> Outcome:
    if experiment is None or experiment.state in ("queued", "running"):
        return Outcome(point.seed)
    if experiment.state == "failed":
        step = diverged_at(experiment)
        return Outcome(point.seed, diverged_at=step,
                       failure=None if step is not None else experiment.failure or f"`dvc queue logs {point.name}`")
    test, train = experiment.metrics.get("test", {}), experiment.metrics.get("train", {})
    return Outcome(point.seed, accuracy=test.get("accuracy"), accuracy_raw=test.get("accuracy_raw"),
                   steps_per_second=train.get("steps_per_second"), seconds=train.get("seconds"))


def build_rows(points: list[Cell], experiments: dict[str, Experiment]) -> list[Row]:
    rows: dict[str, Row] = {}
    for point in points:
        rows.setdefault(point.variant, Row(point.variant)).outcomes.append(outcome(point, experiments.get(point.name)))
    return list(rows.values())


def machine() -> str:
    """The CPU model and core count, as the docs state them beside every figure."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


def footer(points: list[Cell], experiments: dict[str, Experiment], rows: list[Row],
           wall_seconds: float | None) -> list[str]:
    """What the numbers are, and when, where and how long they were measured."""
    finished = [experiments[point.name] for point in points if point.name in experiments
                and experiments[point.name].state == "success"]
    dates = sorted(experiment.timestamp for experiment in finished if experiment.timestamp)
    steps = sorted({experiment.params.get("train", {}).get("steps") for experiment in finished} - {None})
    training = sum(outcome.seconds or 0.0 for row in rows for outcome in row.outcomes)
    seeds = max((len(row.outcomes) for row in rows), default=0)
    seed_range = f"{seeds} seeds per variant (`train.seed` 0..{seeds - 1})" if seeds > 1 else "1 seed (`train.seed` 0)"
    return [f"{seed_range}, {'/'.join(map(str, steps)) or '?'} steps each; "
            f"mean ± sample standard deviation over the seeds; the interval is Welch's t interval for the "
            f"difference of the means; verdict: better or worse only when it excludes 0.",
            f"Runs from {dates[0] if dates else '-'} to {dates[-1] if dates else '-'} on {machine()}; "
            f"training time {training / 60:.1f} min summed over the runs"
            + (f"; this call took {wall_seconds / 60:.1f} min." if wall_seconds is not None else ".")]


def write_report(points: list[Cell], experiments: dict[str, Experiment], output: Path,
                 wall_seconds: float | None) -> list[Row]:
    rows = build_rows(points, experiments)
    notes = footer(points, experiments, rows, wall_seconds)
    table = markdown_table(rows, notes)
    print(table, end="")
    write_bytes_atomic(output / TABLE_FILE, table.encode())
    accuracy_figure(rows, output / FIGURE_FILE, "\n".join(notes))
    print(f"experiments: wrote {output / TABLE_FILE} and {output / FIGURE_FILE}", flush=True)
    return rows


# --- entry point ----------------------------------------------------------------------------


def run_grid(points: list[Cell], jobs: int) -> None:
    actions = plan(points, read_experiments())
    if actions["new"] or actions["failed"] or actions["orphaned"]:
        # Fetch the data once, so that every experiment finds it in the cache instead of downloading it.
        dvc("repro", "download")
    prepare(actions)
    if any(actions[key] for key in ("new", "failed", "orphaned", "queued", "running")):
        print(f"experiments: running the queue, {jobs} at a time", flush=True)
        dvc("exp", "run", "--run-all", "--jobs", str(jobs))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.commands.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds per variant: train.seed 0..SEEDS-1")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (quick runs)")
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once")
    parser.add_argument("--grid", type=Path, default=DEFAULT_GRID,
                        help="the grid file (default: the seed's comparison)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                        help="a sweep instead of the grid file: one variant per value; several --set: their product")
    parser.add_argument("--only", nargs="*", default=[], help="run only these variants of the grid")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where table.md and accuracy.png go")
    parser.add_argument("--report-only", action="store_true", help="write the table from what has run; run nothing")
    parser.add_argument("--rev", default="HEAD", help="with --report-only: the commit the experiments were run from")
    parser.add_argument("--pool", default=None, metavar="WORK_POOL",
                        help="run the cells on the team's Prefect workers of this pool (flows/grid.py), not here")
    parser.add_argument("--attempts", type=int, default=3, help="with --pool: runs of a cell before it is given up")
    parser.add_argument("--publish", action="store_true",
                        help="with --pool: commit table.md and accuracy.png on the branch and push them")
    args = parser.parse_args(argv)
    if args.rev != "HEAD" and not args.report_only:
        parser.error("--rev needs --report-only: experiments are queued from the current commit")
    if args.seeds < 1 or (args.steps is not None and args.steps < 1) or args.jobs < 1 or args.attempts < 1:
        parser.error("--seeds, --steps, --jobs and --attempts must be positive")
    if args.publish and not args.pool:
        parser.error("--publish needs --pool: a local grid never commits or pushes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.pool:  # the pool executor is Prefect code, which lives in flows/ (tasks/ never imports Prefect)
        arguments = sys.argv[1:] if argv is None else argv
        os.execv(sys.executable, [sys.executable, "-m", "flows.grid", *arguments])
    started = time.perf_counter()
    try:  # the whole grid is checked before anything runs
        variants = sweep(args.sets) if args.sets else read_grid(args.grid)
        points = cells(variants, args.seeds, args.steps, args.only)
    except GridError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if not args.report_only:
            run_grid(points, args.jobs)
        experiments = read_experiments(args.rev)
    except KeyboardInterrupt:
        print("experiments: interrupted; queued experiments go on in the background (`dvc queue status`); "
              "run the same command again to resume and write the table", file=sys.stderr)
        return 130
    wall_seconds = None if args.report_only else time.perf_counter() - started
    rows = write_report(points, experiments, args.output, wall_seconds)
    unfinished = sum(len(row.outcomes) - len(row.finished) - len(row.diverged) for row in rows)
    if unfinished and not args.report_only:
        print(f"error: {unfinished} experiments have no result; see `dvc queue status`", file=sys.stderr)
    return 1 if unfinished and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())
