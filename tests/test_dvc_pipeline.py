"""End to end: `dvc repro` in a fresh git + DVC repository on synthetic data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tasks.params import IDX_FILE_NAMES

from .conftest import dvc, make_params_document, make_project

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


def _tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _commit(project: Path, message: str) -> None:
    from .conftest import run_command

    run_command(["git", "add", "-A"], project)
    run_command(["git", "commit", "-q", "-m", message], project)


def test_whole_pipeline_then_a_worse_change_is_rejected(tmp_path: Path, synthetic_source: Path) -> None:
    import json

    import yaml

    project = make_project(tmp_path / "project", make_params_document(synthetic_source))
    dvc(project, "repro")
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9
    assert json.loads((project / "reports" / "promotion.json").read_text())["promoted"] is True
    assert (project / "models" / "production" / "1" / "saved_model.pb").is_file()
    _commit(project, "first model")

    again = dvc(project, "repro")
    for stage in ("download", "train", "evaluate", "promote"):
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout
    assert "up to date" in dvc(project, "status").stdout
    production = _tree_digest(project / "models" / "production")

    document = yaml.safe_load((project / "params.yaml").read_text())
    document["train"]["steps"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    dvc(project, "repro")
    promotion = json.loads((project / "reports" / "promotion.json").read_text())
    assert promotion["promoted"] is False and "below promote.min_accuracy" in promotion["reason"]
    assert _tree_digest(project / "models" / "production") == production
    registry = json.loads((project / "models" / "registry.json").read_text())
    assert [entry["promoted"] for entry in registry] == [True, False]

    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)
    accuracy = diff["reports/metrics.json"]["test.accuracy"]
    assert accuracy["old"] == metrics["test"]["accuracy"] and accuracy["new"] < accuracy["old"]
    plots = dvc(project, "plots", "diff", "--json")
    assert "Confusion matrix" in plots.stdout and "reports/plots/misclassified.png" in plots.stdout
