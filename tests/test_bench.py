"""bench/: the benchmarks run end to end, print tables that agree with themselves, and the
trainers they compare ours with train the same algorithm.

Speed itself is not asserted (that is what the benchmarks are for). These tests keep the
benchmarks working and honest, on tiny synthetic data:

- train_speed.py measures every row (with ``--baseline``, the trainer of an earlier commit too),
  and ``ratio_vs_keras_fit`` = best ours / best Keras fit;
  without JAX it leaves the JAX row out and says so;
- the graph trainer and the JAX peer end with the weights of the train stage's Trainer (to
  float32 rounding): the rows race the same computation;
- step_costs.py measures every rung in both executors, and each "added" is the difference to
  the rung before.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import step_costs, train_speed
from bench.graph_trainer import GraphTrainer
from tasks import mnist
from tasks.model import initial_values
from tasks.params import Params
from tasks.train import BatchOrder
from tasks.trainer import Trainer

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


def _ratio_of_printed(ratio: float, numerator: float, denominator: float) -> bool:
    """Whether ``ratio`` (printed to 2 decimals) is numerator / denominator, both printed to 1
    decimal: the rounding of all three bounds it (a few hundredths when the denominator is small)."""
    low = (numerator - 0.05) / (denominator + 0.05) - 0.005
    high = (numerator + 0.05) / (denominator - 0.05) + 0.005
    return low - 1e-9 <= ratio <= high + 1e-9


@pytest.mark.slow
def test_train_speed_benchmark_reports_all_rows_and_a_consistent_ratio(synthetic_source: Path, tmp_path: Path) -> None:
    lines = _run_benchmark("train_speed.py", synthetic_source, tmp_path, "--rounds", "2",
                           "--baseline", "HEAD").strip().splitlines()

    assert lines[0].startswith("machine: ") and " cores, " in lines[0]  # figures name their machine
    has_jax = importlib.util.find_spec("jax") is not None
    best = {}
    rows = ("keras fit", "ours", "graph trainer", "ours @ HEAD", "ours, 1 step/call")
    for name in rows + (("jax scan",) if has_jax else ()):
        row = next(line for line in lines if re.fullmatch(rf"{re.escape(name)}\s+[\d.]+\s+[\d.]+", line))
        best[name] = float(row.split()[-2])
        assert best[name] > 0
    assert re.fullmatch(r"ratio_vs_keras_fit=\d+\.\d\d", lines[-1])
    assert _ratio_of_printed(float(lines[-1].split("=")[1]), best["ours"], best["keras fit"])
    graph = next(line for line in lines if line.startswith("ours / graph trainer: best / best "))
    assert _ratio_of_printed(float(graph.split()[7].rstrip(",")), best["ours"], best["graph trainer"])
    assert any(line.startswith("ours / ours @ HEAD: best / best ") for line in lines)  # the paired check
    assert not any("floor" in line for line in lines)


def test_train_speed_leaves_the_jax_row_out_without_jax(params: Params, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "jax", None)  # what `import jax` meets when JAX is not installed
    monkeypatch.delitem(sys.modules, "bench.jax_trainer", raising=False)
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    assert train_speed.jax_runner(params.model, params.train, training.images, training.labels, 10, 20) is None
    assert "no jax scan row" in capsys.readouterr().out


def _train_24_steps(trainer, params: Params, labels: np.ndarray) -> dict[str, np.ndarray]:
    batches = BatchOrder(len(labels), params.train.batch_size, params.train.seed).batches(0, 24)
    for first, last in ((0, 20), (20, 24)):
        trainer.run_steps(batches[first:last])
    return trainer.state()


def _assert_same_training(state: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(state[key], value, rtol=1e-5, atol=1e-5 * np.abs(value).max(), err_msg=key)


@pytest.mark.parametrize("peer", ["graph trainer", "jax scan"])
def test_peer_rows_train_what_the_train_stage_trains(params: Params, peer: str) -> None:
    train = params.train.model_copy(update={"l2_rate": 0.01, "learning_rate_decay": 0.5})  # both matter
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    arguments = (train, training.images, training.labels, 4)
    expected = _train_24_steps(Trainer(params.model, *arguments), params, training.labels)
    if peer == "graph trainer":
        trainer = GraphTrainer(params.model, *arguments)
    else:
        pytest.importorskip("jax")
        from bench.jax_trainer import JaxTrainer

        initial = [value.numpy() for value in initial_values(params.model, train.seed)]
        trainer = JaxTrainer(initial, params.model.activation, *arguments)
    _assert_same_training(_train_24_steps(trainer, params, training.labels), expected)


@pytest.mark.slow
def test_step_costs_benchmark_prints_every_rung_and_their_differences(synthetic_source: Path, tmp_path: Path) -> None:
    output = _run_benchmark("step_costs.py", synthetic_source, tmp_path, "--rounds", "1")
    table = output.split("steps/s\n", 1)[1].strip().splitlines()
    assert [line[:28].strip() for line in table] == step_costs.RUNGS
    previous = [0.0] * len(step_costs.EXECUTORS)
    for line in table:
        numbers = [float(value) for value in line[28:].split()]
        assert len(numbers) == 3 * len(step_costs.EXECUTORS)
        for executor in range(len(step_costs.EXECUTORS)):
            milliseconds, added, _ = numbers[3 * executor : 3 * executor + 3]
            assert milliseconds > 0
            assert added == pytest.approx(milliseconds - previous[executor], abs=0.002)
            previous[executor] = milliseconds


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
