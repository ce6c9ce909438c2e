"""The seed's per-step plan, in plain NumPy: the learning rate, the moving average's decay and
the batch order of every step. The trainer (``tasks.lib.trainer``) runs what these say; the
benchmark's peers (``bench/``) and the tests use the same functions, so there is one definition.

Both schedules are worked in float32, as TensorFlow works the seed's: the learning rate as
``tf.train.exponential_decay`` (today Keras ``ExponentialDecay``) with ``staircase=True``, the
decay as ``tf.train.ExponentialMovingAverage`` with ``num_updates``. The batch order is a pure
function of (seed, step), so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

from tasks.lib.params import TrainParams


def learning_rates(train: TrainParams, decay_steps: int, steps: np.ndarray) -> np.ndarray:
    """The learning rate of each of ``steps``: ``learning_rate x learning_rate_decay ^
    floor(step / decay_steps)`` in float32, as the seed's ``tf.train.exponential_decay`` (today
    Keras ``ExponentialDecay``) works it out for one step: rate and decay rounded to float32, the
    power rounded once. TensorFlow's scalar ``pow`` gives these values at every level of the
    seed's run; its vectorised ``pow`` differs in the last bit at some, and working in float64
    then rounding differs at 51 of 55 levels (tests/test_train.py)."""
    levels = np.floor_divide(np.asarray(steps, np.int64), decay_steps)
    powers = (np.float64(np.float32(train.learning_rate_decay)) ** levels).astype(np.float32)
    return np.float32(train.learning_rate) * powers


def moving_average_decays(train: TrainParams, steps: np.ndarray) -> np.ndarray:
    """The moving average's decay at each of ``steps``: ``min(moving_average_decay, (1 + step) /
    (10 + step))``, slow at first, in float32 as ``tf.train.ExponentialMovingAverage`` with
    ``num_updates`` works it out."""
    updates = np.asarray(steps).astype(np.float32)
    return np.minimum(np.float32(train.moving_average_decay), (np.float32(1) + updates) / (np.float32(10) + updates))


def learning_rate_at(step: int, train: TrainParams, decay_steps: int) -> float:
    """One step's learning rate (of ``learning_rates``), for the curve and messages."""
    return float(learning_rates(train, decay_steps, np.array([step]))[0])


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
