"""The TensorFlow side of stage `train`: variables, the fused multi-step graph, evaluation.

``Trainer.run_steps(batches)`` runs one SGD + moving-average step per row of ``batches``
inside a single ``tf.function`` call: a graph loop, so per-step Python dispatch (what limits
Keras ``fit`` on a model this small) is paid once per call, not once per step.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tasks import model as network
from tasks.params import ModelParams, TrainParams


def _apply_in_place(variable: tf.Variable, rate: tf.Tensor, delta: tf.Tensor) -> None:
    """``variable -= rate * delta`` as one fused kernel that writes into the variable's buffer.

    Bit for bit what ``variable.assign_sub(rate * delta)`` computes, without the temporary
    ``rate * delta``: one pass over W1 (784 x 500) instead of two, and one thread-pool hand-off
    instead of two. Used for the SGD step and the moving average, it makes a step ~10% faster
    on 2 cores (bench/train_speed.py).
    """
    tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=rate, delta=delta)


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
        self.images = tf.constant(images, dtype=tf.float32)
        self.labels = tf.constant(labels, dtype=tf.int32)
        self.activation = model.activation
        self.regularised = network.weight_matrices(self.weights)
        self.hyper = {
            "learning_rate": tf.constant(train.learning_rate, tf.float64),
            "learning_rate_decay": tf.constant(train.learning_rate_decay, tf.float64),
            "decay_steps": tf.constant(decay_steps, tf.int64),
            "l2_rate": tf.constant(train.l2_rate, tf.float32),
            "moving_average_decay": tf.constant(train.moving_average_decay, tf.float64),
        }

    def _loss(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        logits = network.inference(images, self.weights, self.activation)
        cross_entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        l2 = tf.add_n([tf.nn.l2_loss(weights) for weights in self.regularised])  # sum of ||W||^2 / 2
        return cross_entropy + self.hyper["l2_rate"] * l2

    def _one_step(self, indices: tf.Tensor) -> tf.Tensor:
        step = self.step.read_value()
        with tf.GradientTape() as tape:
            loss = self._loss(tf.gather(self.images, indices), tf.gather(self.labels, indices))
        gradients = tape.gradient(loss, self.weights)
        h = self.hyper
        exponent = tf.cast(step // h["decay_steps"], tf.float64)  # staircase
        rate = tf.cast(h["learning_rate"] * tf.pow(h["learning_rate_decay"], exponent), tf.float32)
        for weights, gradient in zip(self.weights, gradients):
            _apply_in_place(weights, rate, gradient)  # w -= rate * gradient, bit for bit
        steps_seen = tf.cast(step, tf.float64)
        decay = tf.cast(tf.minimum(h["moving_average_decay"], (1.0 + steps_seen) / (10.0 + steps_seen)), tf.float32)
        # tf.train.ExponentialMovingAverage's own update, average -= (1 - decay) * (average - weights):
        # two passes over each variable where decay * average + (1 - decay) * weights takes three.
        # Same math; the averages round differently in the last bit, weights and losses do not change.
        for average, weights in zip(self.averages, self.weights):
            _apply_in_place(average, 1.0 - decay, average - weights)
        self.step.assign_add(1)
        return loss

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def _run(self, batches: tf.Tensor) -> tf.Tensor:
        count = tf.shape(batches)[0]
        losses = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):
            losses = losses.write(i, self._one_step(batches[i]))
        return losses.stack()

    def run_steps(self, batches: np.ndarray) -> np.ndarray:
        """One training step per row of ``batches`` (example indices); the loss of each step."""
        return self._run(tf.constant(batches)).numpy()

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
