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

Safety: the data is checked against ``data.sha256`` before use; a batch loss that is NaN,
infinite or above ``train.max_loss`` stops the run (``TrainingDiverged``) without touching the
candidate; each checkpoint carries a SHA-256 of its contents, and a damaged one is passed over
with a note in favour of the previous one.

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
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks import mnist
from tasks.params import ModelParams, Params, TrainParams, run_stage

PARAMS_SECTIONS = ("model", "train", "data.validation_size", "data.sha256")
CURVE_COLUMNS = ("step", "loss", "learning_rate", "validation_accuracy_raw", "validation_accuracy")
# Fields that change how long or how often we look, not what is computed at each step.
_NOT_IN_FINGERPRINT = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "steps_per_call", "max_loss"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite or rose above ``train.max_loss``; the candidate model
    was not replaced."""


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
    from tasks.trainer import Trainer  # TensorFlow loads only when training actually runs

    return Trainer(model, train, images, labels, decay_steps)


# --- checkpoints -------------------------------------------------------------------------


def _checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"ckpt-{step:09d}.npz"


@dataclass(frozen=True)
class Checkpoint:
    """``seconds``: training time up to ``step``, over every session, so a resumed run reports
    the speed of the whole run."""

    step: int
    fingerprint: str
    state: dict[str, np.ndarray]
    curve: list[tuple[float, ...]]
    seconds: float


class CheckpointError(ValueError):
    """A checkpoint file is damaged or does not fit this run; training falls back to an older one."""


_META_KEYS = ("step", "fingerprint", "seconds", "curve", "digest")
# What numpy and zipfile raise on damaged .npz files (tests/test_train.py flips thousands of bits
# of one); RuntimeError is zipfile's "encrypted" flag, set by a flipped bit.
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, NotImplementedError, RuntimeError, zipfile.BadZipFile,
               zlib.error)


def _digest(step: int, fingerprint: str, seconds: float, curve: np.ndarray, state: dict[str, np.ndarray]) -> str:
    """SHA-256 over everything a checkpoint holds: any damaged byte of content shows here."""
    digest = hashlib.sha256(f"{step}|{fingerprint}|{seconds!r}".encode())
    for name, array in [("curve", curve), *sorted(state.items())]:
        array = np.ascontiguousarray(array)
        digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_checkpoint(directory: Path, checkpoint: Checkpoint, keep: int) -> None:
    """Write atomically, then keep only the newest ``keep`` checkpoints."""
    curve = np.asarray(checkpoint.curve, dtype=np.float64).reshape(-1, len(CURVE_COLUMNS))
    digest = _digest(checkpoint.step, checkpoint.fingerprint, checkpoint.seconds, curve, checkpoint.state)
    buffer = io.BytesIO()
    np.savez(buffer, step=np.int64(checkpoint.step), fingerprint=np.str_(checkpoint.fingerprint),
             seconds=np.float64(checkpoint.seconds), curve=curve, digest=np.str_(digest), **checkpoint.state)
    mnist.write_bytes_atomic(_checkpoint_path(directory, checkpoint.step), buffer.getvalue())
    for old in sorted(directory.glob("ckpt-*.npz"))[:-keep]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in ``path``, whole and verified against its digest, or CheckpointError."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            contents = {key: stored[key] for key in stored.files}
    except _UNREADABLE as error:
        raise CheckpointError(f"unreadable ({type(error).__name__}: {str(error)[:80]})") from None
    if "digest" not in contents:
        raise CheckpointError("written by an older version of this code, without a digest")
    expected_ndim = {key: 2 if key == "curve" else 0 for key in _META_KEYS}  # the curve is a table, the rest scalars
    missing = [key for key in _META_KEYS if key not in contents or contents[key].ndim != expected_ndim[key]]
    if missing:
        raise CheckpointError(f"{', '.join(missing)} missing or malformed")
    try:
        step, fingerprint = int(contents.pop("step")), str(contents.pop("fingerprint"))
        seconds, curve = float(contents.pop("seconds")), contents.pop("curve")
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"malformed ({error})") from None
    if str(contents.pop("digest")) != _digest(step, fingerprint, seconds, curve, contents):
        raise CheckpointError("its contents do not match its digest (damaged)")
    return Checkpoint(step, fingerprint, contents, [tuple(row) for row in curve.tolist()], seconds)


def _check_fits(checkpoint: Checkpoint, template: dict[str, np.ndarray]) -> None:
    """The arrays are those of this network, the numbers make sense: or CheckpointError."""
    layout = {name: (array.dtype, array.shape) for name, array in checkpoint.state.items()}
    if layout != {name: (array.dtype, array.shape) for name, array in template.items()}:
        raise CheckpointError("its arrays do not match this network's variables")
    if checkpoint.step < 1 or (checkpoint.curve and checkpoint.curve[-1][0] > checkpoint.step):
        raise CheckpointError(f"step {checkpoint.step} does not fit its training curve")
    if not (np.isfinite(checkpoint.seconds) and checkpoint.seconds >= 0):
        raise CheckpointError(f"training time {checkpoint.seconds} is not a duration")
    if not all(np.isfinite(array).all() for array in checkpoint.state.values()):
        raise CheckpointError("it holds non-finite weights")


def find_checkpoint(directory: Path, fingerprint: str, max_step: int,
                    template: dict[str, np.ndarray]) -> tuple[Checkpoint | None, dict[Path, str]]:
    """The newest sound checkpoint of this run at or before ``max_step``, and a note on each
    one passed over because it is damaged or of other params or data."""
    notes = {}
    for path in sorted(directory.glob("ckpt-*.npz"), reverse=True):
        try:
            checkpoint = load_checkpoint(path)
            if checkpoint.fingerprint != fingerprint:
                notes[path] = f"ignoring {path.name}: params or data changed since it was written"
                continue
            _check_fits(checkpoint, template)
        except CheckpointError as error:
            notes[path] = f"ignoring checkpoint {path.name}: {error}"
            continue
        if checkpoint.step <= max_step:
            return checkpoint, notes
    return None, notes


# --- the loop ------------------------------------------------------------------------------


def _next_stop(step: int, train: TrainParams) -> int:
    stops = [train.steps]
    for every in (train.steps_per_call, train.eval_every, train.checkpoint_every):
        stops.append((step // every + 1) * every)
    return min(stops)


def _check_divergence(losses: np.ndarray, first_step: int, train: TrainParams, decay_steps: int) -> None:
    """Stop on a NaN or infinite loss, and on a finite one above ``train.max_loss``: a rate too
    large can throw the loss up by orders of magnitude and back, leaving a useless model."""
    bad = np.flatnonzero(~np.isfinite(losses) | (losses > train.max_loss))
    if bad.size:
        step, loss = first_step + int(bad[0]), float(losses[bad[0]])
        what = f"became {loss}"
        if np.isfinite(loss):
            what = f"reached {loss:.4g} (above train.max_loss {train.max_loss:g})"
        raise TrainingDiverged(
            f"training diverged: the loss {what} at step {step} with learning rate "
            f"{learning_rate_at(step, train, decay_steps):.4g}; lower train.learning_rate (the candidate model was "
            f"not replaced)"
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
        _check_divergence(losses, step, train, decay_steps)
        step = stop
        if step % train.eval_every == 0 or step == train.steps:
            raw, averaged = trainer.accuracy(validation.images, validation.labels)
            loss = float(losses.mean()) + trainer.penalty()  # the penalty moves slowly: taken once, here
            curve.append((step, loss, learning_rate_at(step - 1, train, decay_steps), raw, averaged))
            _progress(step, train.steps, started, first_step, curve[-1])
        if step % train.checkpoint_every == 0 or step == train.steps:
            seconds = seconds_before + time.perf_counter() - started
            save_checkpoint(checkpoints, Checkpoint(step, fingerprint, trainer.state(), curve, seconds),
                            train.keep_checkpoints)
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
    """Load the newest sound checkpoint of this run into ``trainer``; return (curve so far,
    seconds so far). Checkpoints that are damaged or of other params or data are passed over
    with a note; when none is left to resume from, those are deleted and training starts fresh."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    found, notes = find_checkpoint(checkpoints, fingerprint, train.steps, trainer.state())
    for note in notes.values():
        print(f"train: {note}", flush=True)
    if found is None:
        if notes:
            print("train: no usable checkpoint of these params and data; starting fresh", flush=True)
            for passed_over in notes:  # they would only crowd out the new run's checkpoints
                passed_over.unlink(missing_ok=True)
        else:
            print("train: no checkpoint; starting from step 0", flush=True)
        return [], 0.0
    trainer.restore(found.step, found.state)
    print(f"train: resuming from {_checkpoint_path(checkpoints, found.step)} (step {found.step} of {train.steps})",
          flush=True)
    return found.curve, found.seconds


def train_model(model: ModelParams, train: TrainParams, validation_size: int, data_dir: Path,
                candidate_dir: Path, reports_dir: Path, checkpoints: Path, *,
                data_sha256: Mapping[str, str]) -> TrainSummary:
    """Train (or resume) the seed's network and export the EMA model to ``candidate_dir``.

    ``data_sha256`` (params.yaml ``data.sha256``): the data files are checked against it first."""
    mnist.verify_checksums(Path(data_dir), data_sha256)
    training = mnist.load_split(data_dir, "train", validation_size)
    validation = mnist.load_split(data_dir, "validation", validation_size)
    decay_steps = decay_steps_for(train, len(training.labels))
    trainer = _build_trainer(model, train, training.images, training.labels, decay_steps)
    fingerprint = run_fingerprint(model, train, validation_size, data_fingerprint(data_sha256))
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
                       Path(paths.candidate), Path(paths.train_reports), Path(paths.checkpoints),
                       data_sha256=params.data.sha256)


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, __doc__.split("\n")[0], _train_from_params, (TrainingDiverged, mnist.DataError),
                     cached_outputs=lambda params: [params.paths.candidate])


if __name__ == "__main__":
    sys.exit(main())
