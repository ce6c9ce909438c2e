"""dvc.yaml and the stage code cannot drift apart: params, commands and paths agree; and the
committed DVC config verifies what it downloads."""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tasks.lib.params import PathsParams, load_params

from .conftest import REPO_ROOT, project_imports, tool_environment

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_the_pipeline_has_the_designed_stages_in_order() -> None:
    assert list(STAGES) == ["download", "train", "evaluate", "promote"]


class _Recorder:
    """Stands in for the validated params and notes every attribute path read through it."""

    def __init__(self, value: object, path: str, seen: set[str]) -> None:
        self._value, self._path, self._seen = value, path, seen

    def __getattr__(self, name: str) -> object:
        path = f"{self._path}.{name}" if self._path else name
        self._seen.add(path)
        value = getattr(self._value, name)
        return _Recorder(value, path, self._seen) if isinstance(value, BaseModel) else value


def params_read_by(stage: str) -> set[str]:
    """The params.yaml keys a stage's code reads: what its ``stage_arguments`` takes from the params
    (the stage's work function gets those and nothing else), most specific path only, paths aside."""
    seen: set[str] = set()
    recorder = _Recorder(load_params(REPO_ROOT / "params.yaml"), "", seen)
    importlib.import_module(f"tasks.{stage}").stage_arguments(recorder)
    read = {path for path in seen if not any(other.startswith(path + ".") for other in seen)}
    return {path for path in read if path.split(".")[0] not in ("paths", "stage_paths")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_name_exactly_what_its_code_reads(stage: str) -> None:
    declared = set(STAGES[stage].get("params", []))
    assert declared == params_read_by(stage), f"dvc.yaml params of {stage!r} differ from what tasks/{stage}.py reads"


def test_the_params_recorder_sees_a_key_read_inside_a_section() -> None:
    """train reads two keys of `data`, not the whole section: dvc.yaml must name exactly those."""
    assert params_read_by("train") == {"model", "train", "data.validation_size", "data.sha256"}


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


def code_dependencies(stage: str) -> set[str]:
    """Every project file `python -m tasks.<stage>` can execute: its module and, transitively, what it imports."""
    seen, pending = set(), [f"tasks.{stage}"]
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending += project_imports(module)
    return {module.replace(".", "/") + ".py" for module in seen}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_deps_are_exactly_the_modules_it_imports(stage: str) -> None:
    """Edit any module a stage runs and DVC re-runs the stage; list nothing it does not run."""
    declared = {dep for dep in STAGES[stage]["deps"] if dep.endswith(".py")}
    assert declared == code_dependencies(stage), f"dvc.yaml deps of {stage!r}: add or remove these"


def test_the_import_walk_sees_lazy_imports() -> None:
    """train imports the trainer inside a function; leaving it out of dvc.yaml must be caught."""
    assert "tasks/lib/trainer.py" in code_dependencies("train")
    assert "tasks/lib/model.py" in code_dependencies("promote")


def test_package_initialisers_hold_nothing_but_a_docstring() -> None:
    """Importing a stage runs the `__init__.py` of its packages too; they are not in dvc.yaml's
    deps, which is safe only while they cannot change what a stage does."""
    for init in sorted(REPO_ROOT.glob("tasks/**/__init__.py")):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), init


@pytest.mark.slow
def test_the_committed_remote_refuses_a_tampered_object(tmp_path: Path) -> None:
    """`.dvc/config` sets `verify = true` on the default remote: `dvc pull` re-hashes what it
    downloads, so an object changed on the remote never reaches the cache or the workspace."""
    home = tmp_path / "home"
    environment = tool_environment() | {"HOME": str(home)}

    def run(*command: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), cwd=cwd, env=environment, capture_output=True, text=True, check=check)

    project = tmp_path / "project"
    (project / "data" / "raw").mkdir(parents=True)
    run("git", "init", "-q", cwd=project)
    run(sys.executable, "-m", "dvc", "init", "-q", cwd=project)
    shutil.copy(REPO_ROOT / ".dvc" / "config", project / ".dvc" / "config")
    labels = bytes(range(10)) * 1000
    (project / "data" / "raw" / "labels").write_bytes(labels)  # a directory output, like data/raw
    (project / "data" / "raw" / "images").write_bytes(bytes(5000))
    run(sys.executable, "-m", "dvc", "add", "-q", "data/raw", cwd=project)
    run("git", "add", "-A", cwd=project)
    run("git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "-m", "data", cwd=project)
    run(sys.executable, "-m", "dvc", "push", "-q", cwd=project)
    remote = home / ".dvc-remotes" / "mnist-pipeline"
    (stored,) = [path for path in remote.rglob("*") if path.is_file() and path.read_bytes() == labels]
    stored.chmod(0o644)
    tampered = bytearray(labels)
    tampered[1234] = (tampered[1234] + 1) % 10  # one label changed, same size
    stored.write_bytes(bytes(tampered))
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    pulled = run(sys.executable, "-m", "dvc", "pull", cwd=clone, check=False)
    assert pulled.returncode != 0
    assert not (clone / "data" / "raw" / "labels").exists()
    cached = [path.read_bytes() for path in (clone / ".dvc" / "cache").rglob("*") if path.is_file()]
    assert bytes(tampered) not in cached
    assert "up to date" not in run(sys.executable, "-m", "dvc", "status", cwd=clone).stdout
