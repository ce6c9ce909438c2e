"""tasks/lib/grid.py: grids are data, checked whole against the params model before any cell runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.lib.grid import DEFAULT_GRID, GridError, cells, read_grid, sweep
from tasks.lib.params import parse_params

from .conftest import REPO_ROOT, base_params_document, tool_environment

PARAMS = REPO_ROOT / "params.yaml"


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_the_seed_comparison_is_the_default_grid_and_every_cell_is_valid_params() -> None:
    variants = read_grid(REPO_ROOT / DEFAULT_GRID, PARAMS)
    assert list(variants)[0] == "all-optimisations" and len(variants) == 7
    for cell in cells(variants, seeds=2, steps=100, only=[]):
        document = base_params_document()
        for setting in cell.settings:
            key, value = setting.split("=")
            section, field = key.split(".")
            document[section][field] = yaml.safe_load(value)  # as `dvc exp run -S` parses it
        params = parse_params(document)
        assert params.train.seed == cell.seed and params.train.steps == 100


def test_a_sweep_is_one_variant_per_value_and_several_sets_their_product() -> None:
    variants = sweep(["train.learning_rate=0.2,0.4,0.8"], PARAMS)
    assert variants == {"learning_rate-0.2": ("train.learning_rate=0.2",),
                        "learning_rate-0.4": ("train.learning_rate=0.4",),
                        "learning_rate-0.8": ("train.learning_rate=0.8",)}
    product = sweep(["train.learning_rate=0.2,0.4", "model.hidden_units=0,500"], PARAMS)
    assert len(product) == 4 and product["learning_rate-0.4-hidden_units-0"] == (
        "train.learning_rate=0.4", "model.hidden_units=0")
    assert [cell.name for cell in cells(variants, 2, 300, ["learning_rate-0.4"])] == [
        "learning_rate-0.4-300steps-s0", "learning_rate-0.4-300steps-s1"]


@pytest.mark.parametrize("text, message", [
    ("variants: {a: {train.lerning_rate: 0.1}}", "variants.a: train.lerning_rate: unknown parameter (did you mean "
                                                 "'train.learning_rate'?)"),
    ("variants: {a: {nosuch.key: 1}}", "variants.a: nosuch.key: unknown parameter"),
    ("variants: {a: {train.steps: many}}", "variants.a: train.steps = 'many': Input should be a valid integer"),
    ("variants: {a: {train.steps: 0}}", "variants.a: train.steps = 0: Input should be greater than or equal to 1"),
    ("variants: {}", "variants: Dictionary should have at least 1 item"),
    ("variants: {a: {}}\nseeds: 3\n", "seeds: Extra inputs are not permitted"),
    ("variants: {'a b': {}}", "variants.a b"),
    ("variants: [a, b]", "variants: Input should be a valid dictionary"),
])
def test_a_bad_grid_is_one_line_naming_the_place(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(GridError) as raised:
        read_grid(_grid(tmp_path, text), PARAMS)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_bad_sweep_or_an_unknown_variant_is_refused() -> None:
    with pytest.raises(GridError, match="train.steps = 'x'"):
        sweep(["train.steps=100,x"], PARAMS)
    with pytest.raises(GridError, match="expected section.key=value"):
        sweep(["train.steps"], PARAMS)
    with pytest.raises(GridError, match="--only nope: not in the grid"):
        cells(read_grid(REPO_ROOT / DEFAULT_GRID, PARAMS), 1, None, ["nope"])


@pytest.mark.parametrize("arguments", [["--grid", "GRID"], ["--set", "train.l2_rate=0,abc"]])
def test_the_command_refuses_a_bad_grid_before_any_cell_runs(tmp_path: Path, arguments: list[str]) -> None:
    """Run where DVC is not set up: any cell queued would fail otherwise; the refusal is one line."""
    grid = _grid(tmp_path, "variants: {a: {train.stepz: 1}}")
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    command = [sys.executable, "-m", "tasks.commands.experiments",
               *[str(grid) if argument == "GRID" else argument for argument in arguments]]
    result = subprocess.run(command, cwd=tmp_path, env=tool_environment() | {"PYTHONPATH": str(REPO_ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
