"""dvc.yaml and the stage code cannot drift apart: params, commands and paths agree."""

from __future__ import annotations

import importlib
import re

import pytest
import yaml

from tasks.params import PathsParams

from .conftest import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_the_pipeline_has_the_designed_stages_in_order() -> None:
    expected = ["download", "train", "evaluate", "promote"]
    assert list(STAGES) == expected[: len(STAGES)]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_name_exactly_what_its_code_reads(stage: str) -> None:
    module = importlib.import_module(f"tasks.{stage}")
    declared = set(STAGES[stage].get("params", []))
    assert declared == set(module.PARAMS_SECTIONS), f"dvc.yaml params of {stage!r} differ from tasks/{stage}.py"


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_runs_its_module_and_depends_on_its_code(stage: str) -> None:
    definition = STAGES[stage]
    assert definition["cmd"].startswith(f"python -m tasks.{stage}")
    assert f"tasks/{stage}.py" in definition["deps"]


def _declared_paths(definition: dict) -> list[str]:
    entries = definition.get("outs", []) + definition.get("metrics", []) + definition.get("plots", [])
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]


@pytest.mark.parametrize("stage", list(STAGES))
def test_outputs_come_from_the_paths_section(stage: str) -> None:
    known = set(PathsParams.model_fields)
    for path in _declared_paths(STAGES[stage]):
        match = re.match(r"^\$\{paths\.(\w+)\}", path)
        assert match, f"{stage}: {path!r} is hard-coded; use ${{paths.<key>}} from params.yaml"
        assert match.group(1) in known
