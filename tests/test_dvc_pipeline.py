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
