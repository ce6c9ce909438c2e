"""The train stage's graph-mode trainer as it was before the XLA one: a benchmark row only.

``bench/train_speed.py`` times it beside the train stage's ``tasks.trainer.Trainer`` (which
compiles its loop with XLA) and Keras ``fit``, so the speed-up of the XLA loop is measured
against this exact code, in the same process. Nothing in ``tasks/`` uses it.

How it works: ``GraphTrainer.run_steps(batches)`` runs one SGD + moving-average step per row
of ``batches`` inside a single ``tf.function`` call: a graph loop, so per-step Python dispatch
(what limits Keras ``fit`` on a model this small) is paid once per call, not once per step.

A step is two 100x784x500 matmuls plus a handful of passes over W1; everything else here is
about not wasting time around them: updates written in place, gradients by hand (fewer graph
ops than autodiff), the learning rate and moving-average schedule computed once per call, the
moving-average update overlapped with the next forward pass, the L2 penalty computed only
when reported, and a few steps per loop iteration. The result is the plain autodiff version's
to float32 rounding (tests/test_bench.py compares it with the train stage's Trainer).
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


_UNROLL = 5  # steps per graph-loop iteration (see Trainer._run)


class GraphTrainer(tf.Module):
    def __init__(self, model: ModelParams, train: TrainParams, images: np.ndarray, labels: np.ndarray,
                 decay_steps: int) -> None:
        super().__init__(name="graph_trainer")
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

    def _gradients(self, indices: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Mean cross-entropy of a batch and the loss gradients (with the L2 term), by hand.

        Backpropagation through the MLP, the same math tf.GradientTape builds (the tests
        compare the two) without the tape's bookkeeping ops: on steps this small the number
        of graph ops is what costs (5-10% in interleaved A/B runs, within this machine's noise
        alone, clearly so together with the changes below). The L2 penalty's gradient,
        ``l2_rate * W``, is added directly; the penalty itself is only reported.
        """
        images, labels = tf.gather(self.images, indices), tf.gather(self.labels, indices)
        inputs, logits = network.forward(images, self.weights, self.activation)
        losses, logit_gradients = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=logits, labels=labels)
        delta = logit_gradients * (1.0 / tf.cast(tf.shape(labels)[0], tf.float32))  # d mean / d logits
        gradients: list[tf.Tensor] = []
        for layer in reversed(range(len(inputs))):
            weights, _ = network.layers(self.weights)[layer]
            weight_gradient = tf.matmul(inputs[layer], delta, transpose_a=True) + self.hyper["l2_rate"] * weights
            gradients[:0] = [weight_gradient, tf.reduce_sum(delta, axis=0)]
            if layer:
                delta = tf.matmul(delta, weights, transpose_b=True)
                if self.activation == "relu":
                    delta = tf.raw_ops.ReluGrad(gradients=delta, features=inputs[layer])
        return tf.reduce_mean(losses), gradients

    @tf.function(input_signature=[])
    def _penalty(self) -> tf.Tensor:
        return self.hyper["l2_rate"] * tf.add_n([tf.nn.l2_loss(weights) for weights in self.regularised])

    def penalty(self) -> float:
        """The L2 term of the loss now: ``l2_rate`` times the sum of ||W||^2 / 2 over the weight matrices."""
        return float(self._penalty())

    def _schedule(self, count: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Learning rate and moving-average rate (1 - decay) of the next ``count`` steps.

        Computed for a whole call at once, so the loop body does no scalar bookkeeping.
        """
        h = self.hyper
        steps = self.step.read_value() + tf.range(tf.cast(count, tf.int64))
        exponent = tf.cast(steps // h["decay_steps"], tf.float64)  # staircase
        learning_rates = tf.cast(h["learning_rate"] * tf.pow(h["learning_rate_decay"], exponent), tf.float32)
        steps_seen = tf.cast(steps, tf.float64)  # tf.train.ExponentialMovingAverage's num_updates warm-up
        decays = tf.minimum(h["moving_average_decay"], (1.0 + steps_seen) / (10.0 + steps_seen))
        return learning_rates, 1.0 - tf.cast(decays, tf.float32)

    def _one_step(self, indices: tf.Tensor, learning_rate: tf.Tensor, owed_average_rate: tf.Tensor) -> tf.Tensor:
        """One SGD step, after settling the moving-average update the previous step owes; its loss.

        The averages read only the weights, so their update can run while this step's forward
        pass does (TensorFlow orders it before the weights change). Bit for bit the same as
        updating the averages at the end of each step. With the other changes of this module it
        took the loop from ~340 to ~350-420 median steps/s in bench/train_speed.py.
        """
        self._update_averages(owed_average_rate)
        cross_entropy, gradients = self._gradients(indices)
        for weights, gradient in zip(self.weights, gradients):
            _apply_in_place(weights, learning_rate, gradient)  # w -= rate * gradient, bit for bit
        return cross_entropy

    def _update_averages(self, rate: tf.Tensor) -> None:
        # tf.train.ExponentialMovingAverage's own update, average -= (1 - decay) * (average - weights):
        # two passes over each variable where decay * average + (1 - decay) * weights takes three.
        # Same math; the averages round differently in the last bit, weights and losses do not change.
        for average, weights in zip(self.averages, self.weights):
            _apply_in_place(average, rate, average - weights)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def _run(self, batches: tf.Tensor) -> tf.Tensor:
        count = tf.shape(batches)[0]
        learning_rates, average_rates = self._schedule(count)
        # Step i settles step i - 1's average update; a rate of 0 leaves the averages as they are.
        owed_average_rates = tf.concat([[0.0], average_rates[:-1]], axis=0)
        losses = tf.TensorArray(tf.float32, size=count)
        # Several steps per loop iteration: the loop waits for every op of an iteration before
        # the next starts, so unrolling lets one step's tail overlap the next step's head.
        unrolled = count // _UNROLL * _UNROLL
        for first in tf.range(0, unrolled, _UNROLL):
            for i in [first + offset for offset in range(_UNROLL)]:
                losses = losses.write(i, self._one_step(batches[i], learning_rates[i], owed_average_rates[i]))
        for i in tf.range(unrolled, count):
            losses = losses.write(i, self._one_step(batches[i], learning_rates[i], owed_average_rates[i]))
        self._update_averages(average_rates[-1])
        self.step.assign_add(tf.cast(count, tf.int64))
        return losses.stack()

    def run_steps(self, batches: np.ndarray) -> np.ndarray:
        """One training step per row of ``batches`` (example indices); each step's mean batch
        cross-entropy (the loss without the L2 penalty, see ``penalty``)."""
        if len(batches) == 0:
            raise ValueError("run_steps needs at least one batch")
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
