"""tasks/experiments.py: the ablation variants run as real DVC experiments and form a table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tasks.experiments import VARIANTS, format_table
from tasks.params import parse_params

from .conftest import base_params_document, dvc, make_params_document, make_project, run_command


def test_every_variant_is_valid_params() -> None:
    for name, overrides in VARIANTS.items():
        document = base_params_document()
        for override in overrides:
            key, value = override.split("=")
            section, field = key.split(".")
            document[section][field] = yaml.safe_load(value)  # as `dvc exp run -S` parses it
        params = parse_params(document)  # raises on an invalid variant
        assert params != parse_params(base_params_document()) or name == "all-optimisations"


def test_format_table() -> None:
    table = format_table([{"variant": "a", "test.accuracy": 0.98, "test.accuracy_raw": 0.97, "test.errors": 200,
                           "train.steps_per_second": 300.0}])
    header = "| variant | test.accuracy | test.accuracy_raw | test.errors | train.steps_per_second |"
    assert table.splitlines()[0] == header
    assert table.splitlines()[2] == "| a | 0.98 | 0.97 | 200 | 300.0 |"


@pytest.mark.slow
def test_queued_experiments_run_and_fill_the_table(tmp_path: Path, synthetic_source: Path) -> None:
    project = make_project(tmp_path / "project", make_params_document(synthetic_source))
    dvc(project, "repro", "evaluate")
    run_command(["git", "add", "-A"], project)
    run_command(["git", "commit", "-q", "-m", "baseline"], project)
    result = run_command([sys.executable, "-m", "tasks.experiments", "--steps", "30",
                          "--only", "all-optimisations", "no-hidden-layer"], project)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| no-hidden-layer")
            or line.startswith("| all-optimisations")]
    assert len(rows) == 2 and all("None" not in row for row in rows)
    shown = dvc(project, "exp", "show", "--csv").stdout
    assert "no-hidden-layer" in shown and "all-optimisations" in shown
    assert not (project / "models" / "production").exists()  # experiments stop at evaluate


def test_failed_experiments_are_reported_as_failed_not_with_baseline_metrics() -> None:
    from tasks.experiments import rows_from_exp_show

    metrics = {"reports/metrics.json": {"data": {"test": {"accuracy": 0.98, "accuracy_raw": 0.97, "errors": 200},
                                                 "train": {"steps_per_second": 300.0}}}}
    exp_show = [{"rev": "workspace", "experiments": None},
                {"rev": "abc", "experiments": [
                    {"revs": [{"name": "no-activation", "error": {"msg": "Experiment run failed"},
                               "data": {"metrics": metrics}}]},
                    {"revs": [{"name": "all-optimisations", "data": {"metrics": metrics}}]}]}]
    rows = rows_from_exp_show(exp_show, ["all-optimisations", "no-activation"])
    assert rows[0] == {"variant": "all-optimisations", "test.accuracy": 0.98, "test.accuracy_raw": 0.97,
                       "test.errors": 200, "train.steps_per_second": 300.0}
    assert rows[1] == {"variant": "no-activation", "test.accuracy": "failed: `dvc queue logs no-activation`"}
