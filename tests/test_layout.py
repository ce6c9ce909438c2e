"""The layout says what each module is, and the imports keep to it: the four stages are entry
points nothing imports, `tasks/` never imports Prefect or `flows/`, every module of `flows/` is
Prefect code, and no two modules import each other, directly or round about."""

from __future__ import annotations

import ast

import pytest

from .conftest import REPO_ROOT, project_imports

STAGES = ("download", "train", "evaluate", "promote")


def _modules(*folders: str) -> list[str]:
    return sorted(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
                  for folder in folders for path in (REPO_ROOT / folder).rglob("*.py") if path.name != "__init__.py")


def _third_party_imports(module: str) -> set[str]:
    tree = ast.parse((REPO_ROOT / (module.replace(".", "/") + ".py")).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {name.split(".")[0] for name in names}


def test_the_stage_modules_are_the_only_modules_at_the_top_of_tasks() -> None:
    top = {path.stem for path in (REPO_ROOT / "tasks").glob("*.py")} - {"__init__"}
    assert top == set(STAGES)


@pytest.mark.parametrize("module", _modules("tasks", "flows", "bench"))
def test_no_module_imports_a_stage(module: str) -> None:
    assert not {f"tasks.{stage}" for stage in STAGES} & project_imports(module)


@pytest.mark.parametrize("module", _modules("tasks"))
def test_tasks_never_import_prefect_or_flows(module: str) -> None:
    assert not {"prefect", "flows"} & _third_party_imports(module)


@pytest.mark.parametrize("module", _modules("flows"))
def test_every_module_under_flows_is_prefect_code(module: str) -> None:
    uses_prefect = "prefect" in _third_party_imports(module)
    starts_prefect = "python_module(\"prefect\"" in (REPO_ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert uses_prefect or starts_prefect


def test_there_is_no_import_circle() -> None:
    graph = {module: project_imports(module) for module in _modules("tasks", "flows", "bench")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for name in graph.get(start, ()):
            if name == target or (name not in seen and reaches(name, target, seen | {name})):
                return True
        return False

    circles = [module for module in graph if reaches(module, module, {module})]
    assert not circles
