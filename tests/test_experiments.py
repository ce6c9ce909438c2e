"""tasks/commands/experiments.py: the variants × seeds grid as real DVC experiments, its resumption and its table."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.commands.experiments import (
    Experiment,
    build_rows,
    check_params,
    diverged_at,
    experiments_from_exp_show,
    main,
    plan,
)
from tasks.lib.comparison import student_t_quantile
from tasks.lib.divergence import Divergence, TrainingDiverged
from tasks.lib.grid import DEFAULT_GRID, Cell, cells, read_grid
from tasks.lib.params import Params, parse_params

from .conftest import (
    REPO_ROOT,
    base_params_document,
    dvc,
    make_params_document,
    make_project,
    run_command,
    tool_environment,
)

VARIANTS = read_grid(REPO_ROOT / DEFAULT_GRID, REPO_ROOT / "params.yaml")  # the seed's comparison


def grid(seeds: int, steps: int | None, only: list[str]) -> list[Cell]:
    return cells(VARIANTS, seeds, steps, only)


def Planned(variant: str, seed: int, steps: int | None) -> Cell:  # noqa: N802 - reads like the cell it builds
    return Cell(variant, VARIANTS[variant], seed, steps)


def test_every_variant_is_valid_params() -> None:
    for point in grid(seeds=2, steps=100, only=[]):
        document = base_params_document()
        for override in point.settings:
            key, value = override.split("=")
            section, field = key.split(".")
            document[section][field] = yaml.safe_load(value)  # as `dvc exp run -S` parses it
        params = parse_params(document)  # raises on an invalid variant
        assert params.train.seed == point.seed and params.train.steps == 100


def test_grid_names_encode_variant_steps_and_seed() -> None:
    points = grid(seeds=3, steps=None, only=["no-hidden-layer", "all-optimisations"])
    assert [point.name for point in points] == [f"{variant}-s{seed}" for variant in
                                                ("all-optimisations", "no-hidden-layer") for seed in range(3)]
    assert points[4].settings == ["model.hidden_units=0", "train.seed=1"]
    assert Planned("no-lr-decay", 4, 500).name == "no-lr-decay-500steps-s4"
    assert len(grid(seeds=5, steps=None, only=[])) == 5 * len(VARIANTS)


@pytest.mark.parametrize("arguments", [["--seeds", "0"], ["--steps", "-5"], ["--rev", "HEAD~1"]])
def test_bad_arguments_are_one_usage_error_before_anything_runs(arguments: list[str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a DVC repository: any DVC call would fail differently
    with pytest.raises(SystemExit) as raised:
        main(arguments)
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert raised.value.code == 2 and last_line.startswith("python -m tasks.commands.experiments: error:")


def _entry(name: str, state: str | None, metrics: dict | None = None, error: bool = False, log: str | None = None,
           pid: int | None = None) -> dict:
    """An experiment as DVC 3.67 `dvc exp show --json` lists it (fields this module reads)."""
    data = {"timestamp": "2025-01-01T10:00:00", "params": {"params.yaml": {"data": {"train": {"seed": 0}}}},
            "metrics": {"reports/metrics.json": {"data": metrics}} if metrics else {}}
    revision = {"rev": "abc", "name": name, "data": data, "error": {"msg": "Experiment run failed"} if error else None}
    executor = {"state": state, "local": {"log": log, "pid": pid}} if state else None
    return {"revs": [revision], "executor": executor, "name": name}


METRICS = {"test": {"accuracy": 0.98, "accuracy_raw": 0.97, "errors": 200},
           "train": {"steps_per_second": 300.0, "seconds": 10.0}}


def test_exp_show_states_and_the_most_final_of_several_runs_with_one_name() -> None:
    exp_show = [{"rev": "workspace", "experiments": None},
                {"rev": "abc", "experiments": [
                    _entry("a-s0", "success", METRICS), _entry("a-s1", "queued"), _entry("a-s2", "running", pid=7),
                    _entry("b-s0", "failed", METRICS, error=True, log="/x.out"),  # shows its baseline's metrics
                    _entry("b-s1", "failed", error=True), _entry("b-s1", "success", METRICS),  # retried
                    _entry("c-s0", None, METRICS)]}]  # run in the workspace: no executor
    found = experiments_from_exp_show(exp_show)
    assert {name: experiment.state for name, experiment in found.items()} == {
        "a-s0": "success", "a-s1": "queued", "a-s2": "running", "b-s0": "failed", "b-s1": "success",
        "c-s0": "success"}
    assert found["b-s0"].metrics == {} and found["b-s0"].log == "/x.out"
    assert found["a-s2"].pid == 7 and found["a-s0"].metrics["test"]["accuracy"] == 0.98


def _params(point: Planned) -> dict:
    """params.yaml as the experiment of this grid point ran it (only the overridden fields)."""
    params: dict = {}
    for override in point.settings:
        key, value = override.split("=")
        section, field = key.split(".")
        params.setdefault(section, {})[field] = yaml.safe_load(value)
    return params


def _divergence_log(tmp_path: Path, params: Params) -> str:
    """A failed experiment's log as the train stage leaves it when the divergence guard stops it."""
    diverged = TrainingDiverged(Divergence(step=36, loss=float("inf"), learning_rate=0.8), params.train.max_loss)
    path = tmp_path / "run.out"
    path.write_text(f"train: step 20/60\n{diverged.divergence.record_line()}\nerror: {diverged}\n"
                    "ERROR: failed to reproduce 'train'\n")
    return str(path)


def test_plan_keeps_finished_queued_running_and_diverged_and_reruns_failed_and_orphaned(
        tmp_path: Path, params: Params) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a process that has ended
    gone.wait()
    other_log = tmp_path / "other.out"
    other_log.write_text("Killed\n")
    states = {"all-optimisations-s0": ("success", None, None), "all-optimisations-s1": ("queued", None, None),
              "no-lr-decay-s0": ("running", None, os.getpid()), "no-lr-decay-s1": ("running", None, gone.pid),
              "no-activation-s0": ("failed", _divergence_log(tmp_path, params), None),
              "no-activation-s1": ("failed", str(other_log), None)}
    points = grid(seeds=3, steps=None, only=["all-optimisations", "no-lr-decay", "no-activation"])
    experiments = {point.name: Experiment(point.name, states[point.name][0],
                                          METRICS if states[point.name][0] == "success" else {}, _params(point),
                                          log=states[point.name][1], pid=states[point.name][2])
                   for point in points if point.name in states}
    actions = plan(points, experiments)
    names = {key: [point.name for point in points] for key, points in actions.items()}
    assert names == {"done": ["all-optimisations-s0"], "queued": ["all-optimisations-s1"],
                     "running": ["no-lr-decay-s0"], "orphaned": ["no-lr-decay-s1"],
                     "diverged": ["no-activation-s0"], "failed": ["no-activation-s1"],
                     "new": ["all-optimisations-s2", "no-lr-decay-s2", "no-activation-s2"]}
    assert diverged_at(experiments["no-activation-s0"]) == 36


def test_an_experiment_run_with_other_params_is_one_clear_error() -> None:
    experiment = Experiment("no-hidden-layer-s1", "success", METRICS, {"train": {"seed": 1}, "model": {}})
    with pytest.raises(SystemExit, match=r"no-hidden-layer-s1 ran with model.hidden_units=None, not 0; remove it"):
        check_params(Planned("no-hidden-layer", 1, None), experiment)


def test_rows_report_divergence_failure_and_missing_runs(tmp_path: Path, params: Params) -> None:
    points = grid(seeds=2, steps=None, only=["all-optimisations", "no-activation"])
    experiments = {"all-optimisations-s0": Experiment("all-optimisations-s0", "success", METRICS, {}),
                   "all-optimisations-s1": Experiment("all-optimisations-s1", "failed", {}, {}, log="/missing.out"),
                   "no-activation-s0": Experiment("no-activation-s0", "failed", {}, {},
                                                  log=_divergence_log(tmp_path, params))}
    reference, linear = build_rows(points, experiments)
    assert [outcome.accuracy for outcome in reference.outcomes] == [0.98, None]
    assert reference.outcomes[1].failure == "`dvc queue logs all-optimisations-s1`"
    assert [outcome.diverged_at for outcome in linear.outcomes] == [36, None]  # seed 1 not run yet


# --- end to end: real `dvc exp` on tiny synthetic data ----------------------------------------------


def _project(tmp_path: Path, synthetic_source: Path, **train: object) -> Path:
    """A committed project in which nothing has run yet, as in a fresh clone: each experiment
    downloads (here: copies) the data itself."""
    return make_project(tmp_path / "project", make_params_document(synthetic_source, train=train))


def _experiments(project: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "tasks.commands.experiments", *arguments], project, check=check)


def _queue_status(project: Path) -> list[tuple[str, str]]:
    """(name, status) of each task `dvc queue status` lists."""
    lines = dvc(project, "queue", "status").stdout.splitlines()
    rows = [line.split() for line in lines[1:]]
    return [(row[1], row[-1]) for row in rows if row and row[-1] in ("Queued", "Running", "Failed", "Success")]


def _accuracies(project: Path) -> dict[str, float]:
    exp_show = json.loads(dvc(project, "exp", "show", "--json").stdout)
    return {name: experiment.metrics["test"]["accuracy"] for name, experiment in
            experiments_from_exp_show(exp_show).items() if experiment.state == "success"}


def _table_row(project: Path, variant: str) -> list[str]:
    table = (project / "reports" / "experiments" / "table.md").read_text()
    return next(line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith(f"| {variant} |"))


@pytest.mark.slow
def test_two_variants_two_seeds_resume_after_an_interruption_and_match_a_hand_computation(
        tmp_path: Path, synthetic_source: Path) -> None:
    project = _project(tmp_path, synthetic_source)
    only = ["--only", "all-optimisations", "no-hidden-layer"]
    _experiments(project, "--seeds", "1", *only)  # the grid's first seed
    # An interrupted call leaves an experiment queued but not run: the next call must not queue it again.
    interrupted = Planned("no-hidden-layer", 1, None)
    dvc(project, "exp", "run", "--queue", "evaluate", "--name", interrupted.name,
        *[argument for override in interrupted.settings for argument in ("-S", override)])

    output = _experiments(project, "--seeds", "2", *only).stdout
    assert "experiments: 2 done, 1 queued, 1 new" in output
    assert [line for line in output.splitlines() if line.startswith("experiments: queueing")] == [
        "experiments: queueing all-optimisations-s1 train.seed=1"]
    names = [f"{variant}-s{seed}" for variant in ("all-optimisations", "no-hidden-layer") for seed in (0, 1)]
    assert sorted(_queue_status(project)) == sorted((name, "Success") for name in names)  # each ran once
    assert not (project / "models" / "production").exists()  # experiments stop at evaluate

    # The table against a hand computation from the experiments' own metrics.
    accuracies = _accuracies(project)
    reference = [accuracies[f"all-optimisations-s{seed}"] for seed in (0, 1)]
    variant = [accuracies[f"no-hidden-layer-s{seed}"] for seed in (0, 1)]
    for name, values in (("all-optimisations", reference), ("no-hidden-layer", variant)):
        row = _table_row(project, name)
        assert row[:3] == [name, "2", f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"]
    shares = [statistics.variance(values) / 2 for values in (variant, reference)]
    difference = statistics.mean(variant) - statistics.mean(reference)
    if sum(shares) > 0:
        half_width = student_t_quantile(0.975, sum(shares) ** 2 / sum(share**2 for share in shares)) \
            * sum(shares) ** 0.5
    else:
        half_width = 0.0
    low, high = (f"{100 * value:+.2f}".replace("-", "−") for value in (difference - half_width,
                                                                      difference + half_width))
    assert _table_row(project, "no-hidden-layer")[4].endswith(f"[{low}, {high}]")
    expected = "better" if difference - half_width > 0 else "worse" if difference + half_width < 0 else \
        "no measurable difference"
    assert _table_row(project, "no-hidden-layer")[5] == expected
    assert (project / "reports" / "experiments" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "2 seeds per variant (`train.seed` 0..1), 60 steps each" in output


@pytest.mark.slow
def test_a_diverged_variant_is_reported_as_diverged_and_not_run_again(tmp_path: Path, synthetic_source: Path) -> None:
    # At a rate of 0.3 the linear network's loss explodes on the synthetic digits; at 0.1 it trains.
    project = _project(tmp_path, synthetic_source, learning_rate=0.3)
    only = ["--seeds", "1", "--only", "no-activation", "no-activation-lr-0.1"]
    first = _experiments(project, *only)
    row = _table_row(project, "no-activation")
    assert row[1:5] == ["0/1", "-", "-", "-"] and row[5].startswith("diverged (step ")
    assert _table_row(project, "no-activation-lr-0.1")[1] == "1"
    assert "failed" not in first.stdout.split("| variant |")[1]

    second = _experiments(project, *only)
    assert "experiments: 1 done, 1 diverged" in second.stdout and "queueing" not in second.stdout
    assert sorted(_queue_status(project)) == [("no-activation-lr-0.1-s0", "Success"), ("no-activation-s0", "Failed")]


def _wait_for_line(process: subprocess.Popen, marker: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for line in process.stdout:
        if marker in line:
            return
        assert time.monotonic() < deadline, f"no {marker!r} within {seconds} s"
    raise AssertionError(f"the process ended before printing {marker!r}")


def _group_alive(group: int) -> bool:
    """Whether a process of this group still runs (zombies, not yet reaped by their parent, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(process_group) == group and state != "Z":
            return True
    return False


@pytest.mark.slow
def test_an_experiment_whose_worker_was_killed_is_run_again(tmp_path: Path, synthetic_source: Path) -> None:
    """SIGKILL DVC's queue worker mid-run (as a machine restart would): DVC still lists the run as
    running; the next call marks it failed, queues it again and finishes the grid."""
    project = _project(tmp_path, synthetic_source)
    arguments = [sys.executable, "-m", "tasks.commands.experiments", "--seeds", "1", "--steps", "600",
                 "--only", "all-optimisations"]
    driver = subprocess.Popen(arguments, cwd=project, env=tool_environment(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_line(driver, "train: no checkpoint; starting from step 0", 300)
        running = experiments_from_exp_show(json.loads(dvc(project, "exp", "show", "--json").stdout))
        experiment = running["all-optimisations-600steps-s0"]
        assert experiment.state == "running" and experiment.pid
        group = os.getpgid(experiment.pid)
        os.killpg(group, signal.SIGKILL)  # the worker's group: worker, experiment run, stage command
        deadline = time.monotonic() + 30
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(group)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # this test's driver and its `dvc exp run --run-all`
        driver.wait()
    assert _queue_status(project) == [("all-optimisations-600steps-s0", "Running")]  # and never finishes

    output = _experiments(project, "--seeds", "1", "--steps", "600", "--only", "all-optimisations").stdout
    assert "experiments: 1 orphaned" in output and "marking it failed" in output
    assert _queue_status(project) == [("all-optimisations-600steps-s0", "Success")]
    assert _table_row(project, "all-optimisations")[1] == "1"
