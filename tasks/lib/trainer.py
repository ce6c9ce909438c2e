"""The TensorFlow side of stage `train`: variables, the XLA-compiled training loop, evaluation.

``Trainer.run_steps(batches)`` runs one SGD + moving-average step per row of ``batches`` inside
one call of a loop compiled by XLA (``tf.function(jit_compile=True)`` around a
``tf.while_loop``), so per-step Python dispatch (what limits Keras ``fit`` on a model this
small) is paid once per call, not once per step. The loop is functional: weights, averages,
images, labels, batch indices and the per-step schedule go in as arguments, the new weights,
averages and each step's loss come out. XLA fuses the L2 term into the SGD update and the
moving average into one more pass: two elementwise passes over W1 per step, where TensorFlow's
graph executor makes four or five (docs/training.md; ``bench/train_speed.py --baseline 21e9733``
times the graph-mode trainer this one replaced). Between calls the weights and averages live
in ``tf.Variable``s, where checkpoints and evaluation read them.

One compiled program serves every call: the batch indices are padded to
``train.steps_per_call`` rows and the loop runs only the real ones. The program is the same
whatever the call sizes, so a run split into calls differently (by evaluations, checkpoints, a
kill and a resume) ends with bit-identical weights. XLA on CPU is deterministic for a fixed
input: tests/test_trainer.py checks both bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from tasks.lib import model as network
from tasks.lib.params import ModelParams, TrainParams
from tasks.lib.schedules import learning_rates, moving_average_decays
from tasks.lib.tf_loader import tf


class Trainer(tf.Module):
    def __init__(self, model: ModelParams, train: TrainParams, images: np.ndarray, labels: np.ndarray,
                 decay_steps: int) -> None:
        super().__init__(name="trainer")
        tf.random.set_seed(train.seed)
        initial = network.initial_values(model, train.seed)
        self.weights = [tf.Variable(value, name=f"weight_{i}") for i, value in enumerate(initial)]
        # Like tf.train.ExponentialMovingAverage, the averages start at the initial values.
        self.averages = [tf.Variable(value, trainable=False, name=f"average_{i}") for i, value in enumerate(initial)]
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        # Passed to the compiled loop as arguments, like the state: nothing data-sized is
        # compiled into the program.
        self.images = tf.constant(images, dtype=tf.float32)
        self.labels = tf.constant(labels, dtype=tf.int32)
        self.activation = model.activation
        self.train, self.decay_steps = train, decay_steps
        self.l2_rate = tf.constant(train.l2_rate, tf.float32)
        self._loop = _compiled_loop(model.activation, train.moving_average_decay > 0, train.l2_rate)
        self.regularised = network.weight_matrices(self.weights)

    def _schedule(self, first_step: int, count: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Learning rate and moving-average decay of the ``count`` steps from ``first_step``, as
        tasks/lib/schedules.py defines them (float32, as TensorFlow works them), padded with zeros to ``rows``."""
        steps = np.zeros(rows, np.int64)
        steps[:count] = np.arange(first_step, first_step + count)
        rates, decays = learning_rates(self.train, self.decay_steps, steps), moving_average_decays(self.train, steps)
        rates[count:], decays[count:] = 0.0, 0.0
        return rates, decays

    def _run_call(self, batches: np.ndarray) -> np.ndarray:
        """Up to ``train.steps_per_call`` steps in one call of the compiled loop; their losses."""
        count, rows = len(batches), self.train.steps_per_call
        padded = np.zeros((rows, batches.shape[1]), np.int32)  # one shape: one compiled program
        padded[:count] = batches
        rates, decays = self._schedule(self.current_step(), count, rows)
        weights, averages, losses = self._loop(
            self.images, self.labels, tf.constant(padded), tf.constant(count, tf.int32),
            tf.constant(rates), tf.constant(decays),
            [variable.read_value() for variable in self.weights], [variable.read_value() for variable in self.averages])
        for variable, value in zip(self.weights + self.averages, weights + averages):
            variable.assign(value)
        self.step.assign_add(count)
        return losses.numpy()[:count]

    def run_steps(self, batches: np.ndarray) -> np.ndarray:
        """One training step per row of ``batches`` (example indices); each step's mean batch
        cross-entropy (the loss without the L2 penalty, see ``penalty``)."""
        if len(batches) == 0:
            raise ValueError("run_steps needs at least one batch")
        per_call = self.train.steps_per_call
        return np.concatenate([self._run_call(np.asarray(batches[first : first + per_call], np.int32))
                               for first in range(0, len(batches), per_call)])

    @tf.function(input_signature=[])
    def _penalty(self) -> tf.Tensor:
        return self.l2_rate * tf.add_n([tf.nn.l2_loss(weights) for weights in self.regularised])

    def penalty(self) -> float:
        """The L2 term of the loss now: ``l2_rate`` times the sum of ||W||^2 / 2 over the weight matrices."""
        return float(self._penalty())

    @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32), tf.TensorSpec([None], tf.int32)])
    def _accuracies(self, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        def accuracy(variables: list[tf.Variable]) -> tf.Tensor:
            predicted = tf.argmax(network.inference(images, variables, self.activation), axis=1, output_type=tf.int32)
            return tf.reduce_mean(tf.cast(tf.equal(predicted, labels), tf.float32))

        return accuracy(self.weights), accuracy(self.averages)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """(raw, moving-average) accuracy on the given examples."""
        raw, averaged = self._accuracies(tf.constant(images), tf.constant(labels, tf.int32))
        return float(raw), float(averaged)

    def current_step(self) -> int:
        return int(self.step.numpy())

    def state(self) -> dict[str, np.ndarray]:
        state = {f"weight_{i}": v.numpy() for i, v in enumerate(self.weights)}
        state.update({f"average_{i}": v.numpy() for i, v in enumerate(self.averages)})
        return state

    def restore(self, step: int, state: dict[str, np.ndarray]) -> None:
        for i, variable in enumerate(self.weights):
            variable.assign(state[f"weight_{i}"])
        for i, variable in enumerate(self.averages):
            variable.assign(state[f"average_{i}"])
        self.step.assign(step)

    def export(self, directory: str) -> None:
        network.export(network.ServingModel(self.averages, self.weights, self.activation), directory)


def _loss(weights: list[tf.Tensor], images: tf.Tensor, labels: tf.Tensor, activation: str,
          l2_rate: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(mean cross-entropy + L2 penalty, mean cross-entropy) of one batch."""
    logits = network.inference(images, weights, activation)
    cross_entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    penalty = tf.add_n([tf.nn.l2_loss(matrix) for matrix in network.weight_matrices(weights)])
    return cross_entropy + l2_rate * penalty, cross_entropy


@functools.cache
def _compiled_loop(activation: str, averaging: bool, l2_rate: float) -> Callable:
    """The compiled loop for one kind of network, shared by every Trainer of that kind in this
    process. A loop defined per Trainer is traced and compiled by XLA again for each one (about
    a second of CPU, most of a short run's cost); a process that builds several (the tests, the
    bench) compiles each kind once. The graph is the one a per-Trainer loop traces: the same
    ops, the L2 rate the same captured constant, so the program and its results are the same."""
    l2 = tf.constant(l2_rate, tf.float32)

    @tf.function(jit_compile=True)
    def loop(images: tf.Tensor, labels: tf.Tensor, batches: tf.Tensor, count: tf.Tensor, rates: tf.Tensor,
             decays: tf.Tensor, weights: list[tf.Tensor],
             averages: list[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor], tf.Tensor]:
        """The first ``count`` steps of ``batches``: plain SGD, then the moving average, per step."""

        def step(i: tf.Tensor, weights: list[tf.Tensor], averages: list[tf.Tensor],
                 losses: tf.TensorArray) -> tuple:
            indices = batches[i]
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss, cross_entropy = _loss(weights, tf.gather(images, indices), tf.gather(labels, indices),
                                            activation, l2)
            gradients = tape.gradient(loss, weights)
            weights = [value - rates[i] * gradient for value, gradient in zip(weights, gradients)]
            if averaging:
                # The update in the form tf.train.ExponentialMovingAverage (the seed's) computes it:
                # average -= (average - weights) * (1 - decay), with 1 - decay taken in float32.
                rate = 1.0 - decays[i]
                averages = [average - (average - value) * rate for average, value in zip(averages, weights)]
            else:  # no moving average: the "averages" are the weights themselves, exactly
                averages = weights
            return i + 1, weights, averages, losses.write(i, cross_entropy)

        losses = tf.TensorArray(tf.float32, size=tf.shape(batches)[0], element_shape=[])
        _, weights, averages, losses = tf.while_loop(
            lambda i, *_: i < count, step, (tf.constant(0), weights, averages, losses))
        return weights, averages, losses.stack()

    return loop
