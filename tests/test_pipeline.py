"""flows/pipeline.py helpers that need no Prefect server: the stage runner and the reports."""

from __future__ import annotations

import json
from pathlib import Path

from flows.pipeline import promotion_markdown


def test_promotion_markdown(tmp_path: Path) -> None:
    decision = {"promoted": False, "reason": "test accuracy 0.9 is below promote.min_accuracy 0.98",
                "candidate_accuracy": 0.9, "champion_version": 2, "champion_accuracy": 0.984, "version": None,
                "git_revision": "abc", "time": "2026-11-28T00:00:00+00:00"}
    (tmp_path / "promotion.json").write_text(json.dumps(decision))
    markdown = promotion_markdown(tmp_path / "promotion.json")
    assert markdown.startswith("# Promotion: **rejected**")
    assert "| champion v2 | 0.984 |" in markdown and "below promote.min_accuracy" in markdown
