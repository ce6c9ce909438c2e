"""tasks/lib/trainer.py: the XLA-compiled loop computes the plain algorithm, deterministically.

The Trainer runs many steps in one XLA-compiled loop, with the schedule computed per call and
the L2 penalty left out of the per-step loss. The reference below is the textbook version
(tf.GradientTape on the full loss, then SGD and tf.train.ExponentialMovingAverage's update,
one step at a time, in TensorFlow's graph executor). The two agree to float32 rounding: XLA
fuses and orders the arithmetic its own way, which moves the last bits.

Exactness that resume relies on is checked bit for bit: two trainers agree, and so does one
run split into calls differently or compiled for another ``steps_per_call``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from tasks.lib import mnist
from tasks.lib import model as network
from tasks.lib.params import ModelParams, Params, TrainParams
from tasks.lib.schedules import BatchOrder, learning_rates, moving_average_decays
from tasks.lib.trainer import Trainer


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

    steps = np.arange(len(batches))
    schedule = zip(batches, learning_rates(train, decay_steps, steps), moving_average_decays(train, steps))
    losses = [float(step(tf.constant(indices), tf.constant(rate), tf.constant(decay)))
              for indices, rate, decay in schedule]
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
        # Rounding differences are relative to the tensor's scale, not to each (possibly ~0) value.
        np.testing.assert_allclose(state[key], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=key)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
    weights = [state[f"weight_{i}"] for i in range(len(expected_state) // 2)]
    expected_penalty = train.l2_rate * sum(float(np.sum(w.astype(np.float64) ** 2)) / 2 for w in weights if w.ndim == 2)
    assert trainer.penalty() == pytest.approx(expected_penalty, rel=1e-5)


def test_run_steps_rejects_an_empty_call(params: Params) -> None:
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    trainer = Trainer(params.model, params.train, training.images, training.labels, decay_steps=10)
    with pytest.raises(ValueError, match="at least one batch"):
        trainer.run_steps(np.zeros((0, params.train.batch_size), dtype=np.int32))


def _digest(state: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(b"".join(state[key].tobytes() for key in sorted(state))).hexdigest()


def test_results_do_not_depend_on_how_steps_are_split_into_calls(params: Params) -> None:
    """Bit for bit: the property a resumed run (restarted at a checkpoint, between calls) needs."""
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    batches = BatchOrder(len(training.labels), params.train.batch_size, params.train.seed).batches(0, 45)
    digests, losses = set(), []
    for steps_per_call, chunks in ((20, [45]), (20, [45]), (20, [7, 1, 30, 7]), (64, [45]), (3, [20, 25])):
        train = params.train.model_copy(update={"steps_per_call": steps_per_call})
        trainer = Trainer(params.model, train, training.images, training.labels, decay_steps=10)
        run_losses = [trainer.run_steps(batches[sum(chunks[:i]) : sum(chunks[: i + 1])]) for i in range(len(chunks))]
        assert trainer.current_step() == 45
        digests.add(_digest(trainer.state()))
        losses.append(np.concatenate(run_losses))
    assert len(digests) == 1
    for run_losses in losses[1:]:
        assert np.array_equal(run_losses, losses[0])


def test_restored_trainer_continues_bit_for_bit(params: Params) -> None:
    training = mnist.load_split(params.data.sources[0], "train", params.data.validation_size)
    batches = BatchOrder(len(training.labels), params.train.batch_size, params.train.seed).batches(0, 30)
    uninterrupted = Trainer(params.model, params.train, training.images, training.labels, decay_steps=10)
    uninterrupted.run_steps(batches)
    first = Trainer(params.model, params.train, training.images, training.labels, decay_steps=10)
    first.run_steps(batches[:12])
    resumed = Trainer(params.model, params.train, training.images, training.labels, decay_steps=10)
    resumed.restore(12, first.state())
    resumed.run_steps(batches[12:])
    assert resumed.current_step() == 30
    assert _digest(resumed.state()) == _digest(uninterrupted.state())
