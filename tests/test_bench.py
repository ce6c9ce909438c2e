"""bench/: both benchmarks run end to end and print tables that agree with themselves.

Speed itself is not asserted (that is what the benchmarks are for). These tests keep the
benchmarks working, on tiny synthetic data:

- train_speed.py measures all four rows, and ``ratio_vs_keras_fit`` = best ours / best Keras fit;
- step_costs.py measures every rung, and each "added" is the difference to the rung before.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import step_costs

from .conftest import REPO_ROOT, make_params_document, tool_environment


def _run_benchmark(script: str, synthetic_source: Path, tmp_path: Path, *arguments: str) -> str:
    """Run bench/<script> on the synthetic data with the test params; its stdout, after checking it ran cleanly."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(make_params_document(synthetic_source)))
    command = [sys.executable, str(REPO_ROOT / "bench" / script), *arguments,
               "--params", str(params_file), "--raw-data", str(synthetic_source)]
    result = subprocess.run(command, env=tool_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stdout  # it trained on the synthetic IDX files, not on random data
    return result.stdout


@pytest.mark.slow
def test_train_speed_benchmark_reports_all_rows_and_a_consistent_ratio(synthetic_source: Path, tmp_path: Path) -> None:
    lines = _run_benchmark("train_speed.py", synthetic_source, tmp_path, "--rounds", "2").strip().splitlines()

    best = {}
    for name in ("keras fit", "ours", "ours, 1 step/call", "floor"):
        row = next(line for line in lines if re.fullmatch(rf"{re.escape(name)}\s+[\d.]+\s+[\d.]+", line))
        best[name] = float(row.split()[-2])
        assert best[name] > 0
    assert re.fullmatch(r"ratio_vs_keras_fit=\d+\.\d\d", lines[-1])
    assert float(lines[-1].split("=")[1]) == pytest.approx(best["ours"] / best["keras fit"], abs=0.011)
    assert any(line.startswith("floor / keras fit: ") for line in lines)


@pytest.mark.slow
def test_step_costs_benchmark_prints_every_rung_and_their_differences(synthetic_source: Path, tmp_path: Path) -> None:
    output = _run_benchmark("step_costs.py", synthetic_source, tmp_path, "--rounds", "1")
    table = output.split("steps/s\n", 1)[1].strip().splitlines()
    assert [line[:28].strip() for line in table] == step_costs.RUNGS
    previous = 0.0
    for line in table:
        milliseconds, added, _ = (float(value) for value in line[28:].split())
        assert milliseconds > 0
        assert added == pytest.approx(milliseconds - previous, abs=0.002)
        previous = milliseconds


@pytest.mark.slow
def test_train_boundaries_benchmark_adds_up(synthetic_source: Path, tmp_path: Path) -> None:
    lines = _run_benchmark("train_boundaries.py", synthetic_source, tmp_path, "--rounds", "2").strip().splitlines()
    median = {}
    for name in ("graph call", "checkpoint", "curve point"):
        row = next(line for line in lines if re.fullmatch(rf"{name}\s+[\d.]+ ms", line))
        median[name] = float(row.split()[-2]) / 1000
        assert median[name] > 0
    train = make_params_document(synthetic_source)["train"]  # 60 steps, 20 per call, a point and a save every 20
    share = (3 * median["checkpoint"] + 3 * median["curve point"]) / (3 * median["graph call"])
    assert re.fullmatch(r"boundary_share=\d+\.\d{4}", lines[-1])
    assert float(lines[-1].split("=")[1]) == pytest.approx(share, rel=0.05, abs=2e-4)
    assert train["steps"] // train["checkpoint_every"] == train["steps"] // train["eval_every"] == 3
