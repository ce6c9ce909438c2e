"""flows/pipeline.py helpers that need no Prefect server: the stage runner and the reports."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from flows.pipeline import pictures_description, pictures_markdown, promotion_markdown, rounded_change

from .conftest import make_params_document, make_project, tool_environment


def test_promotion_markdown(tmp_path: Path) -> None:
    decision = {"promoted": False, "reason": "test accuracy 0.9 is below promote.min_accuracy 0.98",
                "candidate_accuracy": 0.9, "champion_version": 2, "champion_accuracy": 0.984, "version": None,
                "git_revision": "abc", "time": "2026-11-28T00:00:00+00:00"}
    (tmp_path / "promotion.json").write_text(json.dumps(decision))
    markdown = promotion_markdown(tmp_path / "promotion.json")
    assert markdown.startswith("# Promotion: **rejected**")
    assert "| champion v2 | 0.984 |" in markdown and "below promote.min_accuracy" in markdown


def test_metric_changes_are_rounded_to_the_metrics_precision() -> None:
    assert rounded_change(0.9838, 0.9858, 0.9858 - 0.9838) == 0.002  # not 0.0020000000000000018
    assert rounded_change(0.05108, 0.23125, 0.23125 - 0.05108) == 0.18017
    assert rounded_change(162, 657, 495) == 495
    assert rounded_change(None, 0.5, None) is None


def test_the_pictures_are_data_uris_on_the_first_line_of_the_description(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    (tmp_path / "learning_curves.png").write_bytes(png)
    (tmp_path / "confusion_matrix.png").write_bytes(png)
    encoded = base64.b64encode(png).decode()
    first_line = pictures_description(tmp_path).splitlines()[0]  # all the UI's Artifacts tab shows of it
    assert first_line == (f"![Learning curves](data:image/png;base64,{encoded}) "
                          f"![Confusion matrix](data:image/png;base64,{encoded})")
    markdown = pictures_markdown(tmp_path)
    assert "- Confusion matrix: `confusion_matrix.png`" in markdown
    assert "- Misclassified test digits: (no `misclassified.png`: evaluate did not write it)" in markdown
    assert "data:" not in markdown  # the pictures are stored once, in the description


def test_a_flow_started_while_dvc_holds_the_lock_fails_with_one_line(tmp_path: Path, synthetic_source: Path) -> None:
    import zc.lockfile

    project = make_project(tmp_path / "project", make_params_document(synthetic_source))
    held = zc.lockfile.LockFile(str(project / ".dvc" / "tmp" / "lock"))  # as a running `dvc repro` holds it
    try:
        result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(project)],
                                env=tool_environment(), capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: another DVC command (process {os.getpid()}) holds {project}/.dvc/tmp/lock; "
        "wait for it to finish, then run the flow again"]
