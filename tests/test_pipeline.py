"""flows/pipeline.py helpers that need no Prefect server: the stage runner and the reports."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from flows.pipeline import StageFailed, promotion_markdown, run_command

LOG = logging.getLogger("test")


def test_run_command_returns_the_output_lines(tmp_path: Path) -> None:
    assert run_command(["sh", "-c", "echo one; echo two"], tmp_path, 10, LOG) == ["one", "two"]


def test_run_command_failure_carries_the_last_lines(tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match=r"failed with exit code 3:\nboom"):
        run_command(["sh", "-c", "echo boom; exit 3"], tmp_path, 10, LOG)


def test_run_command_kills_the_whole_process_group_on_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    started = time.monotonic()
    with pytest.raises(StageFailed, match="timed out after 1 s"):
        run_command(["sh", "-c", f"(sleep 3; touch {marker}) & sleep 30"], tmp_path, 1, LOG)
    assert time.monotonic() - started < 10
    time.sleep(3.5)
    assert not marker.exists(), "a child of the stage outlived the time-out"


def test_promotion_markdown(tmp_path: Path) -> None:
    decision = {"promoted": False, "reason": "test accuracy 0.9 is below promote.min_accuracy 0.98",
                "candidate_accuracy": 0.9, "champion_version": 2, "champion_accuracy": 0.984, "version": None,
                "git_revision": "abc", "time": "2026-11-28T00:00:00+00:00"}
    (tmp_path / "promotion.json").write_text(json.dumps(decision))
    markdown = promotion_markdown(tmp_path / "promotion.json")
    assert markdown.startswith("# Promotion: **rejected**")
    assert "| champion v2 | 0.984 |" in markdown and "below promote.min_accuracy" in markdown
