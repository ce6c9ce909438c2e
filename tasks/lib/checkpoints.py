"""Checkpoints of stage `train`: ``tf.train.Checkpoint`` files, kept by ``tf.train.CheckpointManager``.

Layout: ``<checkpoints>/<fingerprint>/ckpt-<step>.index`` and ``.data-00000-of-00001``, plus
TensorFlow's list of them (the ``checkpoint`` file); one directory per run fingerprint (params
and data), so a run resumes only from its own checkpoints. A checkpoint holds the trainer's
weights, averages and step, the training curve so far, the training seconds so far and the
fingerprint: everything a resumed run needs to end exactly like an uninterrupted one.

Safety: TensorFlow writes a checkpoint's data first (through a temporary directory) and its
index last, and keeps a CRC32C of every tensor and of every index block, checked on reading.
``load_checkpoint`` reads into scratch variables (a damaged file never leaves the trainer half
restored) and then checks what was read: ``CheckpointError`` on anything wrong. ``Checkpoints``
finds the newest sound one, newest first, and passes over the others with a one-line note.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.tf_loader import tf  # before anything of TensorFlow: it loads quietly there

# isort: split
import numpy as np
from google.protobuf.message import DecodeError

from tasks.lib.files import directory_or_absent, environment_error

CURVE_WIDTH = 5  # step, loss, learning rate, validation accuracy raw and EMA
_PREFIX = "ckpt"
_FILE = re.compile(rf"{_PREFIX}-(\d+)\.(?:index|data-\d{{5}}-of-\d{{5}})")
_RUN_DIRECTORY = re.compile(r"[0-9a-f]{16}")  # tasks.train.run_fingerprint
_OLDER_FORMAT = re.compile(rf"{_PREFIX}-\d+\.npz")  # what the code before this module wrote into the root
# What reading a damaged checkpoint raises (tests/test_checkpoints.py flips thousands of bits of
# one): TensorFlow's OpError family (checksum, format, missing file), IndexError (a short read of
# the object graph), ValueError/AssertionError (shapes or objects that do not match), DecodeError.
_UNREADABLE = (tf.errors.OpError, IndexError, ValueError, AssertionError, KeyError, TypeError, DecodeError)


@dataclass(frozen=True)
class Snapshot:
    """What one checkpoint holds. ``seconds``: training time up to ``step``, over every session,
    so a resumed run reports the speed of the whole run; ``state`` as ``Trainer.state()``."""

    step: int
    fingerprint: str
    state: dict[str, np.ndarray]
    curve: list[tuple[float, ...]]
    seconds: float


class CheckpointError(ValueError):
    """A checkpoint is damaged or does not fit this run; training falls back to an older one."""


def checkpoint_of(weights: list, averages: list, step: tf.Variable, curve: tf.Variable, seconds: tf.Variable,
                  fingerprint: tf.Variable) -> tf.train.Checkpoint:
    """The one structure of a checkpoint, for writing (the trainer's variables) and reading (scratch ones)."""
    return tf.train.Checkpoint(weights=weights, averages=averages, step=step, curve=curve, seconds=seconds,
                               fingerprint=fingerprint)


def _curve_variable(curve: list[tuple[float, ...]] | np.ndarray = ()) -> tf.Variable:
    value = np.asarray(curve, dtype=np.float64).reshape(-1, CURVE_WIDTH)
    return tf.Variable(value, shape=tf.TensorShape([None, CURVE_WIDTH]), dtype=tf.float64, trainable=False)


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}-{step}"


def _short(error: BaseException, prefix: Path) -> str:
    """The first line of an error, without the graph function TensorFlow names first and with
    the checkpoint's name for its path."""
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", str(error)).replace(str(prefix), prefix.name).strip()
    return f"{type(error).__name__}: {(text.splitlines() or [''])[0][:110]}"


def load_checkpoint(prefix: Path, template: dict[str, np.ndarray], fingerprint: str) -> Snapshot:
    """The checkpoint at ``prefix`` (``.../ckpt-<step>``), read whole and checked against this run:
    its arrays are those of ``template`` (``Trainer.state()``), it is of ``fingerprint``, its
    numbers make sense. Otherwise CheckpointError, and no variable of the trainer was touched."""
    _check_regular_files(prefix)
    count = sum(name.startswith("weight_") for name in template)
    weights = [tf.Variable(np.zeros_like(template[f"weight_{i}"])) for i in range(count)]
    averages = [tf.Variable(np.zeros_like(template[f"average_{i}"])) for i in range(count)]
    step, curve = tf.Variable(0, dtype=tf.int64), _curve_variable()
    seconds, stored_fingerprint = tf.Variable(0.0, dtype=tf.float64), tf.Variable("")
    scratch = checkpoint_of(weights, averages, step, curve, seconds, stored_fingerprint)
    scratch.save_counter  # noqa: B018  (created now, so the file's counter is matched too)
    try:
        scratch.read(str(prefix)).assert_consumed()  # every value in the file has a variable, and back
    except _UNREADABLE as error:
        raise CheckpointError(f"unreadable ({_short(error, prefix)})") from None
    if stored_fingerprint.numpy().decode() != fingerprint:
        raise CheckpointError("it belongs to other params or data")
    state = {f"weight_{i}": v.numpy() for i, v in enumerate(weights)}
    state.update({f"average_{i}": v.numpy() for i, v in enumerate(averages)})
    snapshot = Snapshot(int(step.numpy()), fingerprint, state, [tuple(row) for row in curve.numpy().tolist()],
                        float(seconds.numpy()))
    _check_sense(snapshot)
    return snapshot


def _check_regular_files(prefix: Path) -> None:
    """Each file of the checkpoint is a regular file: TensorFlow would wait for ever on a FIFO."""
    for path in prefix.parent.glob(f"{prefix.name}.*"):
        mode = os.stat(path).st_mode if path.exists() else stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path.name} is not a regular file")


def _check_sense(snapshot: Snapshot) -> None:
    if snapshot.step < 1 or (snapshot.curve and snapshot.curve[-1][0] > snapshot.step):
        raise CheckpointError(f"step {snapshot.step} does not fit its training curve")
    if not (np.isfinite(snapshot.seconds) and snapshot.seconds >= 0):
        raise CheckpointError(f"training time {snapshot.seconds} is not a duration")
    if not all(np.isfinite(array).all() for array in snapshot.state.values()):
        raise CheckpointError("it holds non-finite weights")


def _steps_on_disk(directory: Path) -> list[int]:
    """Steps of the checkpoints in ``directory``, newest first: any of a checkpoint's files counts,
    so one whose index or data is missing is still seen (and reported)."""
    steps = {int(match.group(1)) for path in directory.iterdir() if (match := _FILE.fullmatch(path.name))}
    return sorted(steps, reverse=True)


def _delete(directory: Path, step: int) -> None:
    for path in directory.glob(f"{checkpoint_name(step)}.*"):
        path.unlink(missing_ok=True)


class Checkpoints:
    """The checkpoints of one run (``root/<fingerprint>/``): find the newest sound one, then save."""

    def __init__(self, root: Path, fingerprint: str, keep: int, keep_runs: int = 3) -> None:
        """``keep``: this run's newest checkpoints kept; ``keep_runs``: directories of other params or
        data kept beside it (the most recently written), pruned only once this run has saved."""
        self.root, self.fingerprint, self.keep, self.keep_runs = Path(root), fingerprint, keep, keep_runs
        self.directory = (self.root / fingerprint).resolve()
        self._manager: tf.train.CheckpointManager | None = None

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is, as the user wrote the root: for messages."""
        return self.root / self.fingerprint / checkpoint_name(step)

    def find(self, max_step: int, template: dict[str, np.ndarray]) -> tuple[Snapshot | None, list[str]]:
        """The newest sound checkpoint of this run at or before ``max_step``, and a note on each one
        passed over. Damaged ones are deleted; the checkpoints of other params or data are not
        (``save`` prunes them, within ``keep_runs``, once this run is sure to proceed)."""
        for directory in (self.root, self.root / self.fingerprint):
            directory_or_absent(directory)  # a file where a directory belongs: FileProblem, one line
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(f"{_PREFIX}-*_temp"):  # a save that was killed half-way
            shutil.rmtree(leftover, ignore_errors=True)
        notes, found = [], None
        for step in _steps_on_disk(self.directory):
            if step > max_step:
                continue
            try:
                found = load_checkpoint(self.directory / checkpoint_name(step), template, self.fingerprint)
                break
            except CheckpointError as error:
                notes.append(f"ignoring checkpoint {checkpoint_name(step)}: {error}")
                _delete(self.directory, step)
        notes += [f"ignoring the checkpoints in {other}: params or data changed since they were written"
                  for other in sorted(self._other_runs())]
        notes += [f"ignoring {other}: not a checkpoint of this version of the code" for other in self._older()]
        self._record()
        return found, notes

    def _other_runs(self) -> list[Path]:
        """Directories of other params or data, most recently written first (anything else there is
        left alone)."""
        others = [other for other in self.root.iterdir() if _RUN_DIRECTORY.fullmatch(other.name)
                  and other.is_dir() and not other.is_symlink() and other.resolve() != self.directory]
        return sorted(others, key=lambda other: (other.stat().st_mtime_ns, other.name), reverse=True)

    def _older(self) -> list[Path]:
        return sorted(other for other in self.root.iterdir() if other.is_file() and _OLDER_FORMAT.fullmatch(other.name))

    def _prune_other_runs(self) -> None:
        """Once this run has written a checkpoint (it is sure to proceed): all but the ``keep_runs``
        most recently written directories of other params, and files of the older format, go."""
        for other in self._other_runs()[self.keep_runs:]:
            shutil.rmtree(other, ignore_errors=True)
        for older in self._older():
            older.unlink(missing_ok=True)

    def _record(self) -> None:
        """TensorFlow's list of checkpoints (the ``checkpoint`` file, which the manager prunes by),
        rebuilt from the files present, oldest first: so a damaged or lost list neither hides a
        sound checkpoint nor leaves files that are never pruned."""
        steps = sorted(_steps_on_disk(self.directory))
        state_file = self.directory / "checkpoint"
        if not steps:
            state_file.unlink(missing_ok=True)
            return
        paths = [str(self.directory / checkpoint_name(step)) for step in steps]
        now = time.time()  # later than last_preserved: the manager may prune them all (none is kept for ever)
        # The function CheckpointManager writes this file with, public under compat.v1; TensorFlow
        # warns that the manager should be the one to call it, which is the point: quiet, then.
        tensorflow_logger = tf.get_logger()
        level = tensorflow_logger.level
        tensorflow_logger.setLevel(logging.ERROR)
        try:
            tf.compat.v1.train.update_checkpoint_state(str(self.directory), paths[-1], all_model_checkpoint_paths=paths,
                                                       all_model_checkpoint_timestamps=[now] * len(paths),
                                                       last_preserved_timestamp=now - 1)
        finally:
            tensorflow_logger.setLevel(level)

    def save(self, trainer, curve: Sequence[tuple[float, ...]], seconds: float) -> Path:
        """Write a checkpoint of ``trainer`` at its current step; keep the newest ``keep``."""
        if self._manager is None:
            self._curve, self._seconds = _curve_variable(curve), tf.Variable(seconds, dtype=tf.float64)
            checkpoint = checkpoint_of(trainer.weights, trainer.averages, trainer.step, self._curve, self._seconds,
                                       tf.Variable(self.fingerprint))
            self._manager = tf.train.CheckpointManager(checkpoint, str(self.directory), max_to_keep=self.keep,
                                                       checkpoint_name=_PREFIX)
        self._curve.assign(np.asarray(curve, dtype=np.float64).reshape(-1, CURVE_WIDTH))
        self._seconds.assign(seconds)
        try:
            saved = Path(self._manager.save(checkpoint_number=trainer.current_step()))
        except tf.errors.OpError as error:  # TensorFlow writes the files: a full disk is an OpError here
            raise environment_error(str(error), self.directory) or error from None
        self._prune_other_runs()
        return saved


def newest_checkpoint(root: Path) -> Path | None:
    """The prefix of the newest checkpoint under ``root`` (any run), for inspection and tests."""
    prefixes = [(int(match.group(1)), path.with_suffix("")) for path in Path(root).glob(f"*/{_PREFIX}-*.index")
                if (match := _FILE.fullmatch(path.name))]
    return max(prefixes)[1] if prefixes else None


def read_state(prefix: Path) -> dict[str, np.ndarray]:
    """The weights and averages stored at ``prefix``, named as ``Trainer.state()`` names them,
    without checks: for tests and inspection."""
    reader = tf.train.load_checkpoint(str(prefix))
    state = {}
    for key in reader.get_variable_to_shape_map():
        group, _, rest = key.partition("/")
        if group in ("weights", "averages"):
            state[f"{group[:-1]}_{rest.split('/')[0]}"] = reader.get_tensor(key)
    return state
