"""Stage `train`: the seed's algorithm, fused into few XLA-compiled loop calls, resumable from checkpoints.

The algorithm (defaults in params.yaml reproduce the seed exactly): plain SGD on mean sparse
softmax cross-entropy + ``l2_rate`` x sum(||W||^2 / 2) over the weight matrices; learning rate
``learning_rate x learning_rate_decay ^ floor(step / decay_steps)``; after every step an
exponential moving average of every variable with decay ``min(moving_average_decay,
(1 + step) / (10 + step))``. Both schedules are worked in float32, as TensorFlow works them.
The first ``data.validation_size`` training images validate.

Speed: ``train.steps_per_call`` steps run inside one call of an XLA-compiled loop, so
Python does not dispatch each step. Determinism: the initial weights and the batch order are
pure functions of ``train.seed`` (and, for batches, of the step), so a resumed run ends with
the same weights as an uninterrupted one.

Safety: the data is checked against ``data.sha256`` before use; a batch loss that is NaN,
infinite or above ``train.max_loss`` stops the run (``TrainingDiverged``) without touching the
candidate; a damaged checkpoint is passed over with a note in favour of the previous one
(tasks/lib/checkpoints.py: TensorFlow checkpoints, CRC32C-checked).

Outputs: ``models/candidate/`` (SavedModel, EMA weights serve) and, through DVCLive, in
``reports/train/``: ``plots/metrics/<name>.tsv`` (the training curves, one file per metric of
``CURVE_COLUMNS``; DVC plots) and ``metrics.json`` (the last curve point, rewritten at each one,
so `dvc exp show` shows a running experiment; at the end also ``SUMMARY_KEYS``: the speed and
resume facts evaluate reads). Checkpoints go to ``checkpoints/<fingerprint>/`` (tasks/lib/checkpoints.py),
which DVC does not manage, so they survive the stage being re-run. Checkpoints and logging happen
only between loop calls.

    python -m tasks.train [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.lib import mnist
from tasks.lib.atomic import staged_directory, sweep_leftovers
from tasks.lib.divergence import Divergence, TrainingDiverged, first_divergence
from tasks.lib.params import ModelParams, Params, Paths, TrainParams
from tasks.lib.schedules import BatchOrder, decay_steps_for, learning_rate_at
from tasks.lib.stage import run_stage

if TYPE_CHECKING:  # both load TensorFlow or DVC: imported when training actually runs
    from dvclive import Live

    from tasks.lib.checkpoints import Checkpoints
CURVE_COLUMNS = ("step", "loss", "learning_rate", "validation_accuracy_raw", "validation_accuracy")
SUMMARY_KEYS = ("steps", "resumed_from_step", "seconds", "steps_per_second")
# Fields that change how long or how often we look, not what is computed at each step.
_NOT_IN_FINGERPRINT = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_runs", "steps_per_call",
                       "max_loss"}


@dataclass(frozen=True)
class TrainSummary:
    """``seconds`` and ``steps_per_second`` cover the whole run, across resumed sessions;
    ``final_loss`` is the training loss at the last curve point: the mean batch cross-entropy of
    the steps since the previous loop call, plus the L2 penalty at that point."""

    steps: int
    resumed_from_step: int
    seconds: float
    steps_per_second: float
    final_loss: float
    validation_accuracy_raw: float
    validation_accuracy: float


def data_fingerprint(data_sha256: Mapping[str, str]) -> str:
    """Of the training files, from their verified checksums (the files are not hashed again)."""
    return hashlib.sha256((data_sha256[mnist.TRAIN_IMAGES] + data_sha256[mnist.TRAIN_LABELS]).encode()).hexdigest()


def run_fingerprint(model: ModelParams, train: TrainParams, validation_size: int, data_digest: str) -> str:
    """What a checkpoint must match to be resumed: everything that changes the computation."""
    relevant = {
        "model": model.model_dump(),
        "train": train.model_dump(exclude=_NOT_IN_FINGERPRINT),
        "validation_size": validation_size,
        "data": data_digest,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _build_trainer(model: ModelParams, train: TrainParams, images: np.ndarray, labels: np.ndarray,
                   decay_steps: int):
    # Imported here, not at the top: TensorFlow takes seconds to load, and bad params or data
    # should fail before that.
    from tasks.lib.trainer import Trainer

    return Trainer(model, train, images, labels, decay_steps)


# --- the loop ------------------------------------------------------------------------------


def _next_stop(step: int, train: TrainParams) -> int:
    stops = [train.steps]
    for every in (train.steps_per_call, train.eval_every, train.checkpoint_every):
        stops.append((step // every + 1) * every)
    return min(stops)


def _check_divergence(losses: np.ndarray, first_step: int, train: TrainParams, decay_steps: int) -> None:
    """Stop on a NaN or infinite loss, and on a finite one above ``train.max_loss``."""
    found = first_divergence(losses, first_step, train.max_loss)
    if found is not None:
        step, loss = found
        raise TrainingDiverged(Divergence(step, loss, learning_rate_at(step, train, decay_steps)), train.max_loss)


def _progress(step: int, total: int, started: float, first_step: int, row: tuple[float, ...]) -> None:
    elapsed = time.perf_counter() - started
    rate = (step - first_step) / elapsed if elapsed > 0 else 0.0
    eta = (total - step) / rate if rate > 0 else float("nan")
    print(f"train: step {step:>7}/{total} ({100 * step / total:5.1f}%) | {rate:6.1f} steps/s | ETA {eta:6.1f} s"
          f" | loss {row[1]:.4f} | lr {row[2]:.4g} | validation raw {row[3]:.4f} ema {row[4]:.4f}", flush=True)


def curve_point(step: int, loss: float, learning_rate: float, raw: float, averaged: float) -> tuple[float, ...]:
    """One row of the training curve, rounded as logged, so a resumed run replays exactly what was logged."""
    return (step, round(loss, 6), float(f"{learning_rate:.6g}"), round(raw, 6), round(averaged, 6))


def log_point(live: Live, point: tuple[float, ...]) -> None:
    live.step = int(point[0])  # DVCLive's step is the training step
    for name, value in zip(CURVE_COLUMNS[1:], point[1:]):
        live.log_metric(name, value)


@dataclass(frozen=True)
class Progress:
    """How far a run has come: its curve points so far and its training seconds (across resumes)."""

    curve: tuple[tuple[float, ...], ...] = ()
    seconds: float = 0.0


def run_training(trainer, order: BatchOrder, train: TrainParams, validation: mnist.Split, decay_steps: int,
                 checkpoints: Checkpoints, live: Live, before: Progress) -> Progress:
    """Train from the trainer's current step to ``train.steps``, logging each curve point to
    ``live`` (DVCLive) and saving to ``checkpoints``, both only between loop calls; return the
    whole run's progress (``before``, the resumed part, plus this session's)."""
    curve, seconds_before = list(before.curve), before.seconds
    step = first_step = trainer.current_step()
    started = time.perf_counter()
    while step < train.steps:
        stop = _next_stop(step, train)
        losses = trainer.run_steps(order.batches(step, stop - step))
        _check_divergence(losses, step, train, decay_steps)
        step = stop
        if step % train.eval_every == 0 or step == train.steps:
            raw, averaged = trainer.accuracy(validation.images, validation.labels)
            loss = float(losses.mean()) + trainer.penalty()  # the penalty moves slowly: taken once, here
            curve.append(curve_point(step, loss, learning_rate_at(step - 1, train, decay_steps), raw, averaged))
            log_point(live, curve[-1])
            live.next_step()  # writes metrics.json: `dvc exp show` and the VS Code extension see it now
            _progress(step, train.steps, started, first_step, curve[-1])
        if step % train.checkpoint_every == 0 or step == train.steps:
            checkpoints.save(trainer, curve, seconds_before + time.perf_counter() - started)
    return Progress(tuple(curve), seconds_before + time.perf_counter() - started)


def open_live(reports_dir: Path, curve: Sequence[tuple[float, ...]]) -> Live:
    """A DVCLive logger writing to ``reports_dir``, holding ``curve`` (the points before a resume).

    Not DVCLive's ``resume``: `dvc repro` and `dvc exp run` delete the stage's outputs before
    re-running it, and after a kill DVCLive's files hold points past the checkpoint that the
    resumed run logs again; the checkpoint's curve is exactly the curve of its weights. DVCLive
    writes no dvc.yaml (ours declares its files) and saves no experiment (`dvc exp run` does)."""
    from dvclive import Live  # loads DVC: only when training actually runs

    live = Live(dir=str(reports_dir), report=None, save_dvc_exp=False, dvcyaml=None)
    for point in curve:
        log_point(live, point)
    live.make_summary()
    return live


def _restore(trainer, checkpoints: Checkpoints, train: TrainParams) -> Progress:
    """Load the newest sound checkpoint of this run into ``trainer``; return its progress.
    Checkpoints that are damaged or of other params or data are passed over with a note
    (tasks/lib/checkpoints.py)."""
    found, notes = checkpoints.find(train.steps, trainer.state())
    for note in notes:
        print(f"train: {note}", flush=True)
    if found is None:
        print("train: no usable checkpoint of these params and data; starting fresh" if notes else
              "train: no checkpoint; starting from step 0", flush=True)
        return Progress()
    trainer.restore(found.step, found.state)
    print(f"train: resuming from {checkpoints.path(found.step)} (step {found.step} of {train.steps})", flush=True)
    return Progress(tuple(found.curve), found.seconds)


def _train(trainer, order: BatchOrder, train: TrainParams, validation: mnist.Split, decay_steps: int,
           checkpoints: Checkpoints, live: Live, before: Progress) -> TrainSummary:
    """Run the loop to ``train.steps``; its summary. A divergence is recorded as data, then raised."""
    first_step = trainer.current_step()
    try:
        run = run_training(trainer, order, train, validation, decay_steps, checkpoints, live, before)
    except TrainingDiverged as diverged:  # why it stopped, as data: tasks/lib/divergence.py
        live.summary["stopped"] = asdict(diverged.divergence)
        live.make_summary()
        print(diverged.divergence.record_line(), flush=True)
        raise
    raw, averaged = trainer.accuracy(validation.images, validation.labels)
    return TrainSummary(steps=train.steps, resumed_from_step=first_step, seconds=round(run.seconds, 3),
                        steps_per_second=round(train.steps / run.seconds, 1) if run.seconds > 0 else 0.0,
                        final_loss=run.curve[-1][1], validation_accuracy_raw=raw, validation_accuracy=averaged)


def train_model(model: ModelParams, train: TrainParams, paths: Paths, *, validation_size: int,
                data_sha256: Mapping[str, str]) -> TrainSummary:
    """Train (or resume) the seed's network on ``paths.raw_data`` and export the EMA model to
    ``paths.candidate``; curves go to ``paths.train_reports``, checkpoints to ``paths.checkpoints``.

    ``validation_size`` and ``data_sha256`` are params.yaml ``data.validation_size`` and
    ``data.sha256``; the data files are checked against the latter first."""
    from tasks.lib.checkpoints import Checkpoints  # TensorFlow loads only when training actually runs

    mnist.verify_checksums(paths.raw_data, data_sha256)
    for leftover in sweep_leftovers(paths.candidate):  # of a train stage killed while exporting
        print(f"train: removed {leftover}, left by an interrupted export", flush=True)
    training = mnist.load_split(paths.raw_data, "train", validation_size)
    validation = mnist.load_split(paths.raw_data, "validation", validation_size)
    training_size = len(training.labels)
    decay_steps = decay_steps_for(train, training_size)
    trainer = _build_trainer(model, train, training.images, training.labels, decay_steps)
    del training  # the trainer holds its own copy; this one would only add 172 MB to the peak
    fingerprint = run_fingerprint(model, train, validation_size, data_fingerprint(data_sha256))
    checkpoints = Checkpoints(paths.checkpoints, fingerprint, train.keep_checkpoints, train.keep_runs)
    before = _restore(trainer, checkpoints, train)
    order = BatchOrder(training_size, train.batch_size, train.seed)
    # The candidate is replaced last, when the outer block ends: DVCLive has written every report
    # by then, so no failure (a full disk, say) can leave a new model beside old reports.
    with staged_directory(paths.candidate) as staging, open_live(paths.train_reports, before.curve) as live:
        summary = _train(trainer, order, train, validation, decay_steps, checkpoints, live, before)
        trainer.export(str(staging))
        # Beside the last curve point DVCLive keeps there: what evaluate copies into reports/metrics.json.
        live.summary.update({key: getattr(summary, key) for key in SUMMARY_KEYS})
    print(f"train: {summary.steps} steps, {summary.steps_per_second} steps/s; validation accuracy "
          f"{summary.validation_accuracy:.4f} (EMA) {summary.validation_accuracy_raw:.4f} (raw); "
          f"model in {paths.candidate}/", flush=True)
    return summary


def stage_arguments(params: Params) -> dict[str, object]:
    """What train reads of params.yaml (dvc.yaml lists the same: tests/test_dvc_yaml.py)."""
    return {"model": params.model, "train": params.train, "paths": params.stage_paths,
            "validation_size": params.data.validation_size, "data_sha256": params.data.sha256}


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, __doc__.split("\n")[0], train_model, stage_arguments, (TrainingDiverged, mnist.DataError),
                     cached_outputs=lambda params: [params.paths.candidate])


if __name__ == "__main__":
    sys.exit(main())
