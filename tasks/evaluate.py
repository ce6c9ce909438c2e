"""Stage `evaluate`: score the candidate model and draw what a person needs to judge it.

Checks ``data/raw/`` against ``data.sha256``, then loads ``models/candidate/`` (a SavedModel:
graphs and tensors, no code runs on load) and evaluates its moving-average weights, and its
raw weights for comparison, on the 10000 test images and on the validation split. Writes

* ``reports/metrics.json``: ``test.accuracy`` (EMA), ``test.accuracy_raw``, ``test.loss``,
  ``test.errors``, ``validation.accuracy``, ``validation.accuracy_raw``, ``train.steps``,
  ``train.steps_per_second``, ``train.seconds`` (``dvc metrics show/diff`` read it);
* ``reports/scores.json``: the candidate's test accuracy with what it depends on (the model's
  digest, the test data, the scoring code: ``tasks/lib/scores.py``), which promote reuses;
* ``reports/plots/confusion.csv`` (one row per test image, DVC's ``confusion`` template) and
  PNGs: ``learning_curves.png``, ``confusion_matrix.png``, ``misclassified.png``.

    python -m tasks.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.lib import mnist, plots, scores
from tasks.lib.atomic import write_bytes_atomic
from tasks.lib.files import FileProblem, read_text_file
from tasks.lib.params import EvaluateParams, Params, Paths
from tasks.lib.stage import run_stage

MAX_SUMMARY_BYTES = 1 << 20  # a few hundred bytes written by DVCLive


@dataclass(frozen=True)
class Scores:
    accuracy: float
    accuracy_raw: float
    loss: float
    predicted: np.ndarray


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probabilities[np.arange(len(labels)), labels].mean())


def score(loaded: object, split: mnist.Split, batch_size: int) -> Scores:
    """Accuracy and loss of the EMA weights, and the accuracy of the raw weights."""
    from tasks.lib.model import predict_logits

    logits = predict_logits(loaded, split.images, "serving_float", batch_size)
    raw_logits = predict_logits(loaded, split.images, "raw_weights", batch_size)
    predicted = logits.argmax(axis=1)
    return Scores(accuracy=float((predicted == split.labels).mean()),
                  accuracy_raw=float((raw_logits.argmax(axis=1) == split.labels).mean()),
                  loss=cross_entropy(logits, split.labels), predicted=predicted)


def build_metrics(test: Scores, validation: Scores, test_labels: np.ndarray, train_summary: dict) -> dict:
    """The metric keys users diff; their names and nesting are a contract (docs/ARCHITECTURE.md)."""
    return {
        "test": {"accuracy": round(test.accuracy, 6), "accuracy_raw": round(test.accuracy_raw, 6),
                 "loss": round(test.loss, 6), "errors": int((test.predicted != test_labels).sum())},
        "validation": {"accuracy": round(validation.accuracy, 6), "accuracy_raw": round(validation.accuracy_raw, 6)},
        "train": {"steps": int(train_summary["steps"]), "steps_per_second": train_summary["steps_per_second"],
                  "seconds": train_summary["seconds"]},
    }


def read_train_summary(path: Path) -> dict:
    """The speed and resume facts train left beside its last curve point (a JSON object with
    ``steps``, ``steps_per_second`` and ``seconds``); read as a checked regular file."""
    text = read_text_file(path, MAX_SUMMARY_BYTES)  # FileProblem (a ValueError too) goes up as it is
    try:
        summary = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise FileProblem(f"{path}: not the JSON train writes ({type(error).__name__}); run train again") from None
    if not isinstance(summary, dict) or not all(isinstance(summary.get(key), (int, float)) and
                                                not isinstance(summary.get(key), bool)
                                                for key in ("steps", "steps_per_second", "seconds")):
        raise FileProblem(f"{path}: lacks the numbers steps, steps_per_second and seconds; run the train stage again")
    return summary


def write_plots(plots_dir: Path, test: mnist.Split, predicted: np.ndarray, curves_dir: Path, shown: int) -> None:
    rows = ["actual,predicted"] + [f"{a},{p}" for a, p in zip(test.labels, predicted)]
    write_bytes_atomic(plots_dir / "confusion.csv", ("\n".join(rows) + "\n").encode())
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (test.labels, predicted), 1)
    plots.confusion_matrix(matrix, plots_dir / "confusion_matrix.png")
    wrong = np.flatnonzero(predicted != test.labels)[:shown]
    plots.misclassified_grid(test.images[wrong], test.labels[wrong], predicted[wrong], plots_dir / "misclassified.png")
    plots.learning_curves(curves_dir, plots_dir / "learning_curves.png")


def evaluate_candidate(evaluate: EvaluateParams, paths: Paths, *, validation_size: int,
                       data_sha256: Mapping[str, str]) -> dict:
    """Score ``paths.candidate`` on the test and validation splits of ``paths.raw_data``; write
    ``paths.metrics`` and the plots in ``paths.plots``; return the metrics.

    ``validation_size`` and ``data_sha256`` are params.yaml ``data.validation_size`` and
    ``data.sha256``; the data files are checked against the latter first."""
    from tasks.lib.model import load_serving_model

    mnist.verify_checksums(paths.raw_data, data_sha256)
    loaded = load_serving_model(str(paths.candidate))
    test_split = mnist.load_split(paths.raw_data, "test", validation_size)
    test = score(loaded, test_split, evaluate.batch_size)
    validation = score(loaded, mnist.load_split(paths.raw_data, "validation", validation_size), evaluate.batch_size)
    # DVCLive's layout in train's reports: metrics.json (summary) and plots/metrics/<name>.tsv (curves)
    train_summary = read_train_summary(paths.train_reports / "metrics.json")
    metrics = build_metrics(test, validation, test_split.labels, train_summary)
    write_plots(paths.plots, test_split, test.predicted, paths.train_reports / "plots" / "metrics",
                evaluate.misclassified_shown)
    write_bytes_atomic(paths.metrics, (json.dumps(metrics, indent=2) + "\n").encode())
    key = scores.score_key(paths.candidate, scores.test_sha256(data_sha256), evaluate.batch_size)
    scores.write_record(paths.scores, key, test.accuracy)
    print(f"evaluate: test accuracy {test.accuracy:.4f} (EMA) {test.accuracy_raw:.4f} (raw), "
          f"{metrics['test']['errors']} errors, loss {test.loss:.4f}; validation {validation.accuracy:.4f}", flush=True)
    return metrics


def stage_arguments(params: Params) -> dict[str, object]:
    """What evaluate reads of params.yaml (dvc.yaml lists the same: tests/test_dvc_yaml.py)."""
    return {"evaluate": params.evaluate, "paths": params.stage_paths, "validation_size": params.data.validation_size,
            "data_sha256": params.data.sha256}


def main(argv: list[str] | None = None) -> int:
    from tasks.lib.model import ModelLoadError

    return run_stage(argv, __doc__.split("\n")[0], evaluate_candidate, stage_arguments,
                     (ModelLoadError, mnist.DataError))


if __name__ == "__main__":
    sys.exit(main())
