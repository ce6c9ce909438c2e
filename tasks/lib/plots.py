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
    """Up to len(images) wrong test digits, titled 'true -> predicted'.

    One image of all the digits, each tile with room above it for its title: a grid of 36 small
    plots (matplotlib subplots) took a second of the evaluate stage to lay out and draw."""
    columns = max(1, int(np.ceil(np.sqrt(max(len(images), 1)))))
    rows = max(1, int(np.ceil(len(images) / columns)))
    side, title_room, gap = 28, 12, 6  # pixels of a digit, of the title above it, between columns
    mosaic = np.zeros((rows * (title_room + side), columns * (side + gap)), dtype=np.float32)
    width = 1.4 * columns  # inches; the height follows the mosaic's shape
    figure, axis = _pyplot().subplots(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1]))
    for index, image in enumerate(images):
        top, left = (index // columns) * (title_room + side) + title_room, (index % columns) * (side + gap)
        mosaic[top:top + side, left:left + side] = image.reshape(side, side)
        axis.text(left + side / 2, top - 2, f"{actual[index]} -> {predicted[index]}", fontsize=9,
                  ha="center", va="bottom")
    axis.imshow(mosaic, cmap="gray_r", interpolation="nearest")
    axis.axis("off")
    axis.set_title("misclassified test digits (true -> predicted)", fontsize=12)
    _save(figure, path)
