"""End to end: `dvc repro` in a fresh git + DVC repository on synthetic data."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tasks.lib.params import IDX_FILE_NAMES

from .conftest import dvc, make_params_document, make_project, tree_digest

pytestmark = pytest.mark.slow


def test_dvc_repro_download_then_nothing_to_do(tmp_path: Path, synthetic_source: Path) -> None:
    project = make_project(tmp_path / "project", make_params_document(synthetic_source))
    dvc(project, "repro", "download")
    for name in IDX_FILE_NAMES:
        expected = hashlib.sha256((synthetic_source / name).read_bytes()).hexdigest()
        assert hashlib.sha256((project / "data" / "raw" / name).read_bytes()).hexdigest() == expected
    assert "download" in (project / "dvc.lock").read_text()
    again = dvc(project, "repro", "download")
    assert "didn't change, skipping" in again.stdout
    assert "up to date" in dvc(project, "status", "download").stdout


def test_dvc_repro_download_with_no_good_source_fails_cleanly(tmp_path: Path, synthetic_source: Path) -> None:
    document = make_params_document(synthetic_source)
    document["data"]["sources"] = [str(tmp_path / "missing")]
    project = make_project(tmp_path / "project", document)
    result = dvc(project, "repro", "download", check=False)
    assert result.returncode != 0
    assert "no source delivered verified MNIST" in result.stdout + result.stderr
    assert not (project / "data" / "raw").exists()
    assert not (project / "dvc.lock").exists()



def _commit(project: Path, message: str) -> None:
    from .conftest import run_command

    run_command(["git", "add", "-A"], project)
    run_command(["git", "commit", "-q", "-m", message], project)


def test_whole_pipeline_then_a_worse_change_is_rejected(tmp_path: Path, synthetic_source: Path) -> None:
    import json

    import yaml

    project = make_project(tmp_path / "project", make_params_document(synthetic_source))
    first = dvc(project, "repro")
    log = first.stdout + first.stderr  # every stage's output, TensorFlow's start-up included
    assert "cuInit" not in log and not re.search(r"^[IW]\d{4} ", log, re.MULTILINE), log
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9
    assert json.loads((project / "reports" / "promotion.json").read_text())["promoted"] is True
    assert (project / "models" / "production" / "1" / "saved_model.pb").is_file()
    _commit(project, "first model")

    again = dvc(project, "repro")
    for stage in ("download", "train", "evaluate", "promote"):
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout
    assert "up to date" in dvc(project, "status").stdout
    production = tree_digest(files_only=True, directory=project / "models" / "production")

    document = yaml.safe_load((project / "params.yaml").read_text())
    document["train"]["steps"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    dvc(project, "repro")
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    assert promotion["promoted"] is False and "below promote.min_accuracy" in promotion["reason"]
    assert tree_digest(files_only=True, directory=project / "models" / "production") == production
    registry = json.loads((project / "models" / "registry.json").read_text())
    assert [entry["promoted"] for entry in registry] == [True, False]

    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)
    accuracy = diff["reports/metrics.json"]["test.accuracy"]
    assert accuracy["old"] == metrics["test"]["accuracy"] and accuracy["new"] < accuracy["old"]
    plots = dvc(project, "plots", "diff", "--json")
    assert "Confusion matrix" in plots.stdout and "reports/plots/misclassified.png" in plots.stdout


def test_push_then_fresh_clone_and_pull_restores_everything(tmp_path: Path, synthetic_source: Path) -> None:
    """The committed default remote (`~/.dvc-remotes/mnist-pipeline`, HOME pointed at tmp_path)."""
    import os
    import shutil
    import subprocess
    import sys

    from .conftest import REPO_ROOT, tool_environment

    project = make_project(tmp_path / "project", make_params_document(synthetic_source))
    shutil.copy(REPO_ROOT / ".dvc" / "config", project / ".dvc" / "config")
    environment = tool_environment() | {"HOME": str(tmp_path / "home")}

    def run(command: list[str], cwd: Path) -> None:
        subprocess.run(command, cwd=cwd, env=environment, check=True, capture_output=True, text=True)

    run([sys.executable, "-m", "dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "trained"], project)
    run([sys.executable, "-m", "dvc", "push"], project)
    assert (tmp_path / "home" / ".dvc-remotes" / "mnist-pipeline" / "files").is_dir()
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models" / "candidate").exists()
    run([sys.executable, "-m", "dvc", "pull"], clone)
    for restored in ("data/raw", "models/candidate", "models/production", "models/registry.json"):
        original, copy = project / restored, clone / restored
        assert (tree_digest(files_only=True, directory=original) if original.is_dir() else original.read_bytes()) == (
            tree_digest(files_only=True, directory=copy) if copy.is_dir() else copy.read_bytes()), restored
    assert "up to date" in dvc(clone, "status").stdout
    assert os.environ.get("HOME") != str(tmp_path / "home")


def test_concurrent_repro_one_proceeds_the_other_stops_cleanly(tmp_path: Path, synthetic_source: Path) -> None:
    import subprocess
    import sys
    import time

    from .conftest import tool_environment

    document = make_params_document(synthetic_source)
    document["train"].update(steps=4000, steps_per_call=10, eval_every=1000, checkpoint_every=1000)
    project = make_project(tmp_path / "project", document)
    first = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=tool_environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert first.stdout is not None
    for line in first.stdout:  # wait until the first run is inside the train stage
        if "Running stage 'train'" in line:
            break
    time.sleep(1)
    second = dvc(project, "repro", check=False)
    output = second.stdout + second.stderr
    assert second.returncode != 0
    assert "is busy, it is being blocked by" in output and "dvc" in output
    assert "Running stage" not in output  # it stopped before running anything
    first.stdout.read()
    assert first.wait() == 0
    assert "up to date" in dvc(project, "status").stdout
    assert (project / "models" / "production" / "1").is_dir()
