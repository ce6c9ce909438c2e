"""tasks/trainer.py: the fast training graph computes the plain autodiff algorithm.

The Trainer computes gradients by hand, overlaps each moving-average update with the next
forward pass, unrolls its loop and leaves the L2 penalty out of the per-step loss. The
reference below is the textbook version (tf.GradientTape on the full loss, then SGD and
tf.train.ExponentialMovingAverage's update, one step at a time). The two agree to float32
rounding: summing the bias gradients in another order moves the last bit of a few values.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tasks import mnist
from tasks import model as network
from tasks.params import ModelParams, Params, TrainParams
from tasks.train import BatchOrder
from tasks.trainer import Trainer


def _reference_run(model: ModelParams, train: TrainParams, images: np.ndarray, labels: np.ndarray,
                   decay_steps: int, batches: np.ndarray) -> tuple[dict[str, np.ndarray], list[float]]:
    initial = network.initial_values(model, train.seed)
    weights = [tf.Variable(value) for value in initial]
    averages = [tf.Variable(value) for value in initial]
    images, labels = tf.constant(images), tf.constant(labels)

    @tf.function
    def step(indices: tf.Tensor, rate: tf.Tensor, decay: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = network.inference(tf.gather(images, indices), weights, model.activation)
            cross_entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.gather(labels, indices), logits=logits))
            penalty = tf.add_n([tf.nn.l2_loss(w) for w in network.weight_matrices(weights)])
            loss = cross_entropy + train.l2_rate * penalty
        for variable, gradient in zip(weights, tape.gradient(loss, weights)):
            variable.assign_sub(rate * gradient)
        for average, variable in zip(averages, weights):
            average.assign_sub((1.0 - decay) * (average - variable))
        return cross_entropy

    losses = []
    for number, indices in enumerate(batches):
        rate = np.float32(train.learning_rate * train.learning_rate_decay ** (number // decay_steps))
        decay = np.float32(min(train.moving_average_decay, (1 + number) / (10 + number)))
        losses.append(float(step(tf.constant(indices), tf.constant(rate), tf.constant(decay))))
    state = {f"weight_{i}": v.numpy() for i, v in enumerate(weights)}
    state.update({f"average_{i}": v.numpy() for i, v in enumerate(averages)})
    return state, losses


@pytest.mark.parametrize("hidden_units, activation", [(500, "relu"), (64, "linear"), (0, "relu")])
def test_trainer_equals_plain_autodiff(params: Params, hidden_units: int, activation: str) -> None:
    model = params.model.model_copy(update={"hidden_units": hidden_units, "activation": activation})
    train = params.train.model_copy(update={"l2_rate": 0.01})
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    decay_steps = 4  # several learning-rate changes within the run
    batches = BatchOrder(len(training.labels), train.batch_size, train.seed).batches(0, 24)
    expected_state, expected_losses = _reference_run(model, train, training.images, training.labels,
                                                     decay_steps, batches)

    trainer = Trainer(model, train, training.images, training.labels, decay_steps)
    losses = []
    for first, last in ((0, 11), (11, 12), (12, 24)):  # odd chunk sizes: unrolled part and remainder
        losses.extend(trainer.run_steps(batches[first:last]).tolist())

    assert trainer.current_step() == 24
    state = trainer.state()
    for key, expected in expected_state.items():
        np.testing.assert_allclose(state[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
    weights = [state[f"weight_{i}"] for i in range(len(expected_state) // 2)]
    expected_penalty = train.l2_rate * sum(float(np.sum(w.astype(np.float64) ** 2)) / 2 for w in weights if w.ndim == 2)
    assert trainer.penalty() == pytest.approx(expected_penalty, rel=1e-5)


def test_run_steps_rejects_an_empty_call(params: Params) -> None:
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    trainer = Trainer(params.model, params.train, training.images, training.labels, decay_steps=10)
    with pytest.raises(ValueError, match="at least one batch"):
        trainer.run_steps(np.zeros((0, params.train.batch_size), dtype=np.int32))
