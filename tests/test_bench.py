"""bench/: the benchmarks run end to end, print tables that agree with themselves, and the
trainers they compare ours with train the same algorithm.

Speed itself is not asserted (that is what the benchmarks are for). These tests keep the
benchmarks working and honest, on tiny synthetic data:

- train_speed.py measures every row (with ``--baseline``, the trainer of an earlier commit too),
  and ``ratio_vs_keras_fit`` = best ours / best Keras fit;
  without JAX it leaves the JAX row out and says so;
- the JAX peer, and a ``--baseline`` revision's Trainer in either layout (``tasks/lib/trainer.py``,
  or ``tasks/trainer.py`` before ``tasks.lib``), end with the weights of the train stage's
  Trainer (to float32 rounding): the rows race the same computation.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import train_speed
from tasks.lib import mnist, processes
from tasks.lib.model import initial_values
from tasks.lib.params import Params
from tasks.lib.schedules import BatchOrder
from tasks.lib.trainer import Trainer

from .conftest import REPO_ROOT, make_params_document, tool_environment


def _run_benchmark(script: str, synthetic_source: Path, tmp_path: Path, *arguments: str) -> str:
    """Run bench/<script> on the synthetic data with the test params; its stdout, after checking it ran cleanly."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(make_params_document(synthetic_source)))
    command = [sys.executable, str(REPO_ROOT / "bench" / script), *arguments,
               "--params", str(params_file), "--raw-data", str(synthetic_source)]
    result = processes.run(command, timeout=300, environment=tool_environment())
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
    rows = ("keras fit", "ours", "ours @ HEAD", "ours, 1 step/call")
    for name in rows + (("jax scan",) if has_jax else ()):
        row = next(line for line in lines if re.fullmatch(rf"{re.escape(name)}\s+[\d.]+\s+[\d.]+", line))
        best[name] = float(row.split()[-2])
        assert best[name] > 0
    assert re.fullmatch(r"ratio_vs_keras_fit=\d+\.\d\d", lines[-1])
    assert _ratio_of_printed(float(lines[-1].split("=")[1]), best["ours"], best["keras fit"])
    paired = next(line for line in lines if line.startswith("ours / ours @ HEAD: best / best "))  # the paired check
    assert _ratio_of_printed(float(paired.split()[8].rstrip(",")), best["ours"], best["ours @ HEAD"])
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


def test_the_jax_peer_trains_what_the_train_stage_trains(params: Params) -> None:
    pytest.importorskip("jax")
    from bench.jax_trainer import JaxTrainer

    train = params.train.model_copy(update={"l2_rate": 0.01, "learning_rate_decay": 0.5})  # both matter
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    arguments = (train, training.images, training.labels, 4)
    expected = _train_24_steps(Trainer(params.model, *arguments), params, training.labels)
    initial = [value.numpy() for value in initial_values(params.model, train.seed)]
    trainer = JaxTrainer(initial, params.model.activation, *arguments)
    _assert_same_training(_train_24_steps(trainer, params, training.labels), expected)


def _serve_the_working_tree_as_a_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``trainer_at`` read today's ``tasks/`` tree where it would ask git for a revision's
    (the ``tasks.lib`` layout, whether or not a commit has it yet)."""
    def git(*arguments: str) -> str:
        if arguments[0] == "ls-tree":
            paths = sorted((REPO_ROOT / "tasks").rglob("*.py"))
            return "\n".join(path.relative_to(REPO_ROOT).as_posix() for path in paths)
        assert arguments[0] == "show"
        return (REPO_ROOT / arguments[1].split(":", 1)[1]).read_text()

    monkeypatch.setattr(train_speed, "_git", git)


@pytest.mark.parametrize(("revision", "module"), [("4214159", "trainer"), ("working tree", "lib.trainer")])
def test_a_baseline_revision_trains_what_ours_trains(params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     revision: str, module: str) -> None:
    """``--baseline`` loads the Trainer of a revision in either layout: ``tasks/trainer.py`` (4214159,
    the commit before ``tasks.lib``) or ``tasks/lib/trainer.py`` (today's tree), subpackages and all."""
    if revision == "working tree":
        _serve_the_working_tree_as_a_revision(monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))  # trainer_at puts the scratch directory on it
    package = "tasks_at_" + revision.replace(" ", "_")
    try:
        trainer_class = train_speed.trainer_at(revision, tmp_path)
        assert trainer_class.__module__ == f"{package}.{module}"
        assert Path(sys.modules[trainer_class.__module__].__file__).is_relative_to(tmp_path)  # the copy, not ours
        training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
        arguments = (params.train, training.images, training.labels, 4)
        expected = _train_24_steps(Trainer(params.model, *arguments), params, training.labels)
        _assert_same_training(_train_24_steps(trainer_class(params.model, *arguments), params, training.labels),
                              expected)
    finally:
        for name in [name for name in sys.modules if name == package or name.startswith(f"{package}.")]:
            del sys.modules[name]


def test_a_baseline_revision_git_does_not_know_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--baseline: git ls-tree"):
        train_speed.trainer_at("no-such-revision", tmp_path)


@pytest.mark.slow
def test_fixed_costs_benchmark_splits_each_stage_into_phases_that_add_up(synthetic_source: Path,
                                                                         tmp_path: Path) -> None:
    """Each stage timed gets a block whose phases (start and exit, imports, the named phases, the
    rest) add up to its wall time, and a machine-readable line; promote, after evaluate scored the
    candidate in the set-up's `dvc repro`, imports no TensorFlow. (Two stages without TensorFlow,
    to keep the test short; the set-up runs all four.)"""
    params_file = tmp_path / "params.yaml"
    # evaluate scores in promote's batches (tasks/lib/scores.py SCORING_BATCH), so promote may reuse its score
    params_file.write_text(yaml.safe_dump(make_params_document(synthetic_source, evaluate={"batch_size": 2000})))
    command = [sys.executable, str(REPO_ROOT / "bench" / "fixed_costs.py"), "--rounds", "1", "--steps", "40",
               "--no-flow", "--stage", "download", "--stage", "promote", "--raw-data", str(synthetic_source),
               "--params", str(params_file),
               "--scratch", str(tmp_path)]
    result = processes.run(command, timeout=900, environment=tool_environment())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    blocks = result.stdout.split("\n\n")
    for stage in ("download", "promote"):
        block = next(block for block in blocks if block.startswith(f"{stage} (median of 1 rounds"))
        rows = {line[:32].strip(): float(line.split()[-1]) for line in block.splitlines()[2:]}
        assert {"wall", "start and exit"} <= set(rows) and any(name.startswith("import ") for name in rows)
        assert rows["wall"] >= sum(value for name, value in rows.items() if name != "wall") - 0.05  # shown >= 0.05
        assert re.search(rf"^{stage}_seconds=\d+\.\d\d$", result.stdout, re.MULTILINE)
    assert "import tensorflow" not in next(block for block in blocks if block.startswith("promote"))


def test_the_fixed_costs_ledger_charges_each_interval_once() -> None:
    from bench.fixed_costs import Ledger, _import_phase

    ledger = Ledger()
    ledger.enter("work")
    ledger.enter(_import_phase(ledger.stack[-1], "tensorflow.python"))
    ledger.enter(_import_phase(ledger.stack[-1], "numpy"))  # inside TensorFlow's import: charged to it
    assert ledger.stack == ["rest", "work", "import tensorflow", "import tensorflow"]
    ledger.leave()
    ledger.leave()
    ledger.leave()
    assert _import_phase("import (project)", "numpy") == "import numpy" and _import_phase("rest", "tasks.lib") == \
        "import (project)"
    total = sum(ledger.totals.values())
    assert set(ledger.totals) == {"rest", "work", "import tensorflow"} and total == pytest.approx(
        ledger.last - ledger.started, abs=1e-9)
