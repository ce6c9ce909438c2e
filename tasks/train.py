"""Stage `train`: the seed's algorithm, fused into few graph calls, resumable from checkpoints.

The algorithm (defaults in params.yaml reproduce the seed exactly): plain SGD on mean sparse
softmax cross-entropy + ``l2_rate`` x sum(||W||^2 / 2) over the weight matrices; learning rate
``learning_rate x learning_rate_decay ^ floor(step / decay_steps)``; after every step an
exponential moving average of every variable with decay ``min(moving_average_decay,
(1 + step) / (10 + step))``. The first ``data.validation_size`` training images validate.

Speed: ``train.steps_per_call`` steps run inside one ``tf.function`` call (a graph loop), so
Python does not dispatch each step. Determinism: the initial weights and the batch order are
pure functions of ``train.seed`` (and, for batches, of the step), so a resumed run ends with
the same weights as an uninterrupted one.

Outputs: ``models/candidate/`` (SavedModel, EMA weights serve), ``reports/train/curve.csv``
(DVC plots) and ``reports/train/summary.json``. Checkpoints go to ``checkpoints/``, which DVC
does not manage, so they survive the stage being re-run.

    python -m tasks.train [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks import mnist
from tasks.params import ModelParams, Params, TrainParams, run_stage

PARAMS_SECTIONS = ("model", "train", "data.validation_size")
CURVE_COLUMNS = ("step", "loss", "learning_rate", "validation_accuracy_raw", "validation_accuracy")
# Fields that change how long or how often we look, not what is computed at each step.
_NOT_IN_FINGERPRINT = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "steps_per_call"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was written to the candidate directory."""


@dataclass(frozen=True)
class TrainSummary:
    """``seconds`` and ``steps_per_second`` cover the whole run, across resumed sessions;
    ``final_loss`` is the training loss at the last curve point: the mean batch cross-entropy of
    the steps since the previous graph call, plus the L2 penalty at that point."""

    steps: int
    resumed_from_step: int
    seconds: float
    steps_per_second: float
    final_loss: float
    validation_accuracy_raw: float
    validation_accuracy: float


def learning_rate_at(step: int, train: TrainParams, decay_steps: int) -> float:
    """The seed's staircase exponential decay."""
    return train.learning_rate * train.learning_rate_decay ** (step // decay_steps)


def moving_average_decay_at(step: int, train: TrainParams) -> float:
    """tf.train.ExponentialMovingAverage with num_updates: slow at first, then the set decay."""
    return min(train.moving_average_decay, (1 + step) / (10 + step))


def decay_steps_for(train: TrainParams, training_size: int) -> int:
    return train.decay_steps or max(1, training_size // train.batch_size)


class BatchOrder:
    """Batch ``step`` of a run: a fresh permutation per epoch, a pure function of (seed, step)."""

    def __init__(self, training_size: int, batch_size: int, seed: int) -> None:
        self.training_size, self.batch_size, self.seed = training_size, batch_size, seed
        self.steps_per_epoch = training_size // batch_size
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.training_size)}
        return self._permutations[epoch]

    def batches(self, first_step: int, count: int) -> np.ndarray:
        rows = []
        for step in range(first_step, first_step + count):
            epoch, position = divmod(step, self.steps_per_epoch)
            start = position * self.batch_size
            rows.append(self._permutation(epoch)[start : start + self.batch_size])
        return np.asarray(rows, dtype=np.int32)


def data_fingerprint(data_dir: Path) -> str:
    return hashlib.sha256(
        "".join(mnist.sha256_of(Path(data_dir) / name) for name in (mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS)).encode()
    ).hexdigest()


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
    from tasks.trainer import Trainer  # TensorFlow loads only when training actually runs

    return Trainer(model, train, images, labels, decay_steps)


# --- checkpoints -------------------------------------------------------------------------


def _checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:09d}.npz"


def save_checkpoint(directory: Path, step: int, fingerprint: str, state: dict[str, np.ndarray],
                    curve: list[tuple[float, ...]], keep: int, seconds: float) -> None:
    """``seconds``: training time up to ``step``, over every session, so a resumed run reports
    the speed of the whole run."""
    buffer = io.BytesIO()
    np.savez(buffer, step=np.int64(step), fingerprint=np.str_(fingerprint), seconds=np.float64(seconds),
             curve=np.asarray(curve, dtype=np.float64).reshape(-1, len(CURVE_COLUMNS)), **state)
    mnist.write_bytes_atomic(_checkpoint_path(directory, step), buffer.getvalue())
    for old in sorted(directory.glob("ckpt-*.npz"))[:-keep]:
        old.unlink(missing_ok=True)


def find_checkpoint(directory: Path, fingerprint: str, max_step: int) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of this run at or before ``max_step``, and notes on the others."""
    notes = []
    for path in sorted(directory.glob("ckpt-*.npz"), reverse=True):
        try:
            with np.load(path, allow_pickle=False) as stored:
                found, step = str(stored["fingerprint"]), int(stored["step"])
        except (OSError, ValueError, KeyError) as error:
            notes.append(f"ignoring unreadable checkpoint {path.name} ({error})")
            continue
        if found != fingerprint:
            notes.append(f"ignoring {path.name}: params or data changed since it was written")
        elif step <= max_step:
            return path, notes
    return None, notes


def load_checkpoint(path: Path) -> tuple[int, dict[str, np.ndarray], list[tuple[float, ...]], float]:
    """(step, variables, curve so far, training seconds so far)."""
    with np.load(path, allow_pickle=False) as stored:
        state = {key: stored[key] for key in stored.files if key not in ("step", "fingerprint", "curve", "seconds")}
        curve = [tuple(row) for row in stored["curve"].tolist()]
        return int(stored["step"]), state, curve, float(stored["seconds"])


# --- the loop ------------------------------------------------------------------------------


def _next_stop(step: int, train: TrainParams) -> int:
    stops = [train.steps]
    for every in (train.steps_per_call, train.eval_every, train.checkpoint_every):
        stops.append((step // every + 1) * every)
    return min(stops)


def _check_finite(losses: np.ndarray, first_step: int, train: TrainParams, decay_steps: int) -> None:
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = first_step + int(bad[0])
        raise TrainingDiverged(
            f"training diverged: the loss became {losses[bad[0]]} at step {step} with learning rate "
            f"{learning_rate_at(step, train, decay_steps):.4g}; lower train.learning_rate "
            f"(nothing was written to the candidate model)"
        )


def _progress(step: int, total: int, started: float, first_step: int, row: tuple[float, ...]) -> None:
    elapsed = time.perf_counter() - started
    rate = (step - first_step) / elapsed if elapsed > 0 else 0.0
    eta = (total - step) / rate if rate > 0 else float("nan")
    print(f"train: step {step:>7}/{total} ({100 * step / total:5.1f}%) | {rate:6.1f} steps/s | ETA {eta:6.1f} s"
          f" | loss {row[1]:.4f} | lr {row[2]:.4g} | validation raw {row[3]:.4f} ema {row[4]:.4f}", flush=True)


def run_training(trainer, order: BatchOrder, train: TrainParams, validation: mnist.Split, decay_steps: int,
                 checkpoints: Path, fingerprint: str, curve: list[tuple[float, ...]],
                 seconds_before: float) -> float:
    """Train from the trainer's current step to ``train.steps``; return the training seconds of
    the whole run (this session plus ``seconds_before``)."""
    step = first_step = trainer.current_step()
    started = time.perf_counter()
    while step < train.steps:
        stop = _next_stop(step, train)
        losses = trainer.run_steps(order.batches(step, stop - step))
        _check_finite(losses, step, train, decay_steps)
        step = stop
        if step % train.eval_every == 0 or step == train.steps:
            raw, averaged = trainer.accuracy(validation.images, validation.labels)
            loss = float(losses.mean()) + trainer.penalty()  # the penalty moves slowly: taken once, here
            curve.append((step, loss, learning_rate_at(step - 1, train, decay_steps), raw, averaged))
            _progress(step, train.steps, started, first_step, curve[-1])
        if step % train.checkpoint_every == 0 or step == train.steps:
            save_checkpoint(checkpoints, step, fingerprint, trainer.state(), curve, train.keep_checkpoints,
                            seconds_before + time.perf_counter() - started)
    return seconds_before + time.perf_counter() - started


def _write_reports(reports_dir: Path, curve: list[tuple[float, ...]], summary: TrainSummary) -> None:
    lines = [",".join(CURVE_COLUMNS)] + [f"{int(r[0])},{r[1]:.6f},{r[2]:.6g},{r[3]:.6f},{r[4]:.6f}" for r in curve]
    mnist.write_bytes_atomic(reports_dir / "curve.csv", ("\n".join(lines) + "\n").encode())
    mnist.write_bytes_atomic(reports_dir / "summary.json", (json.dumps(asdict(summary), indent=2) + "\n").encode())


def _export_atomically(trainer, candidate_dir: Path) -> None:
    candidate_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=candidate_dir.parent, prefix=f".{candidate_dir.name}.partial-"))
    try:
        trainer.export(str(staging / "model"))
        shutil.rmtree(candidate_dir, ignore_errors=True)
        (staging / "model").rename(candidate_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _restore(trainer, checkpoints: Path, fingerprint: str, train: TrainParams) -> tuple[list, float]:
    """Load the newest matching checkpoint into ``trainer``; return (curve so far, seconds so far)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    found, notes = find_checkpoint(checkpoints, fingerprint, train.steps)
    for note in notes:
        print(f"train: {note}", flush=True)
    if found is None:
        if notes:
            print("train: params or data changed since the last checkpoints; starting fresh", flush=True)
            for stale in checkpoints.glob("ckpt-*.npz"):
                stale.unlink(missing_ok=True)
        else:
            print("train: no checkpoint; starting from step 0", flush=True)
        return [], 0.0
    step, state, curve, seconds = load_checkpoint(found)
    trainer.restore(step, state)
    print(f"train: resuming from {found} (step {step} of {train.steps})", flush=True)
    return curve, seconds


def train_model(model: ModelParams, train: TrainParams, validation_size: int, data_dir: Path,
                candidate_dir: Path, reports_dir: Path, checkpoints: Path) -> TrainSummary:
    """Train (or resume) the seed's network and export the EMA model to ``candidate_dir``."""
    training = mnist.load_split(data_dir, "train", validation_size)
    validation = mnist.load_split(data_dir, "validation", validation_size)
    decay_steps = decay_steps_for(train, len(training.labels))
    trainer = _build_trainer(model, train, training.images, training.labels, decay_steps)
    fingerprint = run_fingerprint(model, train, validation_size, data_fingerprint(data_dir))
    curve, seconds_before = _restore(trainer, Path(checkpoints), fingerprint, train)
    first_step = trainer.current_step()
    order = BatchOrder(len(training.labels), train.batch_size, train.seed)
    seconds = run_training(trainer, order, train, validation, decay_steps, Path(checkpoints),
                           fingerprint, curve, seconds_before)
    raw, averaged = trainer.accuracy(validation.images, validation.labels)
    summary = TrainSummary(steps=train.steps, resumed_from_step=first_step, seconds=round(seconds, 3),
                           steps_per_second=round(train.steps / seconds, 1) if seconds > 0 else 0.0,
                           final_loss=curve[-1][1], validation_accuracy_raw=raw, validation_accuracy=averaged)
    _export_atomically(trainer, Path(candidate_dir))
    _write_reports(Path(reports_dir), curve, summary)
    print(f"train: {summary.steps} steps, {summary.steps_per_second} steps/s; validation accuracy "
          f"{averaged:.4f} (EMA) {raw:.4f} (raw); model in {candidate_dir}/", flush=True)
    return summary


def _train_from_params(params: Params) -> TrainSummary:
    paths = params.paths
    return train_model(params.model, params.train, params.data.validation_size, Path(paths.raw_data),
                       Path(paths.candidate), Path(paths.train_reports), Path(paths.checkpoints))


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, __doc__.split("\n")[0], _train_from_params, (TrainingDiverged, mnist.DataError))


if __name__ == "__main__":
    sys.exit(main())
