"""tasks/evaluate.py: the metric keys, their values, and the pictures."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tasks.evaluate import cross_entropy, evaluate_candidate
from tasks.lib import mnist
from tasks.lib.model import ModelLoadError
from tasks.lib.params import Params, Paths, parse_params
from tasks.train import train_model

from .conftest import make_params_document, write_synthetic


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One training run for the module (the synthetic data, and so the model, are the same in every
    test); its root and the data's checksums."""
    source = tmp_path_factory.mktemp("source")
    write_synthetic(source)
    params = parse_params(make_params_document(source))
    root = tmp_path_factory.mktemp("trained") / "run"
    train_model(params.model, params.train, _paths(params, root), validation_size=params.data.validation_size,
                data_sha256=params.data.sha256)
    return root, params.data.sha256


@pytest.fixture
def trained(params: Params, trained_once: tuple[Path, dict], tmp_path: Path) -> Path:
    """A copy of that run for one test, which may damage it."""
    root, data_sha256 = trained_once
    assert params.data.sha256 == data_sha256  # the same synthetic data, so the same model
    shutil.copytree(root, tmp_path / "run")
    return tmp_path / "run"


def _paths(params: Params, root: Path) -> Paths:
    """The default layout in ``root`` (reports/train, reports/metrics.json, ...), data from the params."""
    return replace(Paths.under(root), raw_data=Path(params.data.sources[0]), candidate=root / "candidate")


def _evaluate(params: Params, root: Path) -> dict:
    return evaluate_candidate(params.evaluate, _paths(params, root), validation_size=params.data.validation_size,
                              data_sha256=params.data.sha256)


def test_metrics_keys_and_values(params: Params, trained: Path) -> None:
    metrics = _evaluate(params, trained)
    assert json.loads((trained / "reports" / "metrics.json").read_text()) == metrics
    assert set(metrics) == {"test", "validation", "train"}
    assert set(metrics["test"]) == {"accuracy", "accuracy_raw", "loss", "errors"}
    assert set(metrics["validation"]) == {"accuracy", "accuracy_raw"}
    assert {"steps", "steps_per_second"} <= set(metrics["train"])
    test_size = len(mnist.load_split(Path(params.data.sources[0]), "test", 0).labels)
    assert metrics["test"]["errors"] == round((1 - metrics["test"]["accuracy"]) * test_size)
    assert metrics["test"]["accuracy"] > 0.8 and metrics["train"]["steps"] == params.train.steps


def test_plots_are_written(params: Params, trained: Path) -> None:
    _evaluate(params, trained)
    plots = trained / "reports" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == [
        "confusion.csv", "confusion_matrix.png", "learning_curves.png", "misclassified.png"]
    for png in plots.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rows = (plots / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + 200


def test_metrics_are_stable_across_runs(params: Params, trained: Path) -> None:
    first = _evaluate(params, trained)
    assert _evaluate(params, trained) == first


def test_missing_or_corrupt_candidate_is_a_clear_error(params: Params, trained: Path) -> None:
    (trained / "candidate" / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        _evaluate(params, trained)
    assert not (trained / "reports" / "metrics.json").exists()


def test_cross_entropy_matches_the_definition() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    expected = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1 + np.exp(-1))), np.log(1 / 3)])
    assert cross_entropy(logits, np.array([0, 1])) == pytest.approx(expected)


def test_tampered_data_is_refused_before_use(params: Params, trained: Path) -> None:
    """A byte of the test labels changed in place, size and time restored (DVC sees nothing)."""
    data = Path(params.data.sources[0])
    labels = data / mnist.TEST_LABELS
    before = labels.stat()
    content = bytearray(labels.read_bytes())
    content[-1] = (content[-1] + 1) % 10
    labels.write_bytes(bytes(content))
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(mnist.DataError, match=f"{mnist.TEST_LABELS} was changed or damaged"):
        _evaluate(params, trained)
    assert not (trained / "reports" / "metrics.json").exists()
