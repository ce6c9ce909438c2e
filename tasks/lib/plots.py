"""PNG pictures a person looks at: learning curves, the confusion matrix, misclassified digits.

DVC renders the CSV plots itself (`dvc plots show/diff`); these PNGs are for people reading
`reports/plots/` directly or in `dvc plots diff` output. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from tasks.lib.atomic import write_bytes_atomic
from tasks.lib.files import FileProblem, read_text_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_CURVE_BYTES = 64 << 20  # a row per curve point, ~20 bytes: room for 3 million points


def _pyplot() -> ModuleType:
    """matplotlib.pyplot, headless (Agg: no display on servers and CI), imported when the first
    picture is drawn: the import takes a second or more, and evaluate refuses bad params or
    data before it draws anything."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def _save(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    # A fixed timestamp-free PNG keeps the bytes stable across identical runs.
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(figure)
    write_bytes_atomic(path, buffer.getvalue())


def _curve(curves_dir: Path, name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one curve, from DVCLive's ``<name>.tsv`` (columns ``step``, ``<name>``)."""
    path = curves_dir / f"{name}.tsv"
    text = read_text_file(path, MAX_CURVE_BYTES)  # a FIFO or an endless file is refused, not read
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))
        return [int(row["step"]) for row in rows], [float(row[name]) for row in rows]
    except (KeyError, TypeError, ValueError) as error:
        raise FileProblem(f"{path}: not a training curve of DVCLive ({type(error).__name__}: {error})") from None


def learning_curves(curves_dir: Path, path: Path) -> None:
    """From the training curves train logs through DVCLive (``reports/train/plots/metrics/``)."""
    figure, (loss_axis, accuracy_axis, rate_axis) = _pyplot().subplots(1, 3, figsize=(15, 4))
    loss_axis.plot(*_curve(curves_dir, "loss"))
    loss_axis.set(title="training loss (cross-entropy + L2)", xlabel="step", yscale="log")
    for name, label in (("validation_accuracy", "moving average"), ("validation_accuracy_raw", "raw weights")):
        accuracy_axis.plot(*_curve(curves_dir, name), label=label)
    accuracy_axis.set(title="validation accuracy", xlabel="step")
    accuracy_axis.legend()
    rate_axis.plot(*_curve(curves_dir, "learning_rate"))
    rate_axis.set(title="learning rate", xlabel="step")
    _save(figure, path)


def confusion_matrix(matrix: np.ndarray, path: Path) -> None:
    figure, axis = _pyplot().subplots(figsize=(7, 6))
    shown = axis.imshow(np.log1p(matrix), cmap="Blues")
    for (actual, predicted), count in np.ndenumerate(matrix):
        if count:
            color = "white" if matrix[actual, predicted] > matrix.max() / 2 else "black"
            axis.text(predicted, actual, str(count), ha="center", va="center", fontsize=7, color=color)
    axis.set(title="confusion matrix (test set)", xlabel="predicted", ylabel="actual",
             xticks=range(10), yticks=range(10))
    figure.colorbar(shown, label="log(1 + count)")
    _save(figure, path)


def misclassified_grid(images: np.ndarray, actual: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    """Up to len(images) wrong test digits, titled 'true -> predicted'."""
    columns = max(1, int(np.ceil(np.sqrt(max(len(images), 1)))))
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure, axes = _pyplot().subplots(rows, columns, figsize=(1.4 * columns, 1.6 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index].reshape(28, 28), cmap="gray_r")
            axis.set_title(f"{actual[index]} -> {predicted[index]}", fontsize=9)
    figure.suptitle("misclassified test digits (true -> predicted)")
    _save(figure, path)
