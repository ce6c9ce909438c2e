"""What each part of a training step costs: a ladder of graph loops, side by side in one run.

Each rung is a ``tf.function`` loop over real MNIST batches (the seed's 784-500-10 network, batch
size, learning rate, L2 rate and average decay from ``params.yaml``; the learning rate is held
constant) that does a bit more of the seed's step than the rung before:

1. ``floor without the average``: ``x @ W1``, W1's gradient matmul, W1's SGD update;
2. ``+ real gradients``: the whole forward and backward pass (biases, ReLU, second layer,
   softmax cross-entropy), still updating only W1;
3. ``+ bias and W2 updates``: every variable updated;
4. ``+ L2``: the L2 gradient added to both weight matrices;
5. ``+ moving average``: every variable's average updated every step, as in the seed.

Rung 5 is the seed's step, written plainly (the train stage's ``Trainer`` is a tuned version
of it; ``bench/train_speed.py`` times that one). The rungs are timed in rotating order for
``--rounds`` rounds of 550 steps. The output is the median ms per step of each rung and what it
adds to the rung before. It shows where the time goes, and that no single part dominates.

    python bench/step_costs.py [--rounds 8] [--params params.yaml] [--raw-data data/raw]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tasks import model as network  # noqa: E402
from tasks.params import ModelParams, TrainParams, load_params  # noqa: E402
from tasks.train import BatchOrder  # noqa: E402

RUNGS = ["floor without the average", "+ real gradients", "+ bias and W2 updates", "+ L2", "+ moving average"]
STEPS = 550


def apply(variable: tf.Variable, rate: tf.Tensor, delta: tf.Tensor) -> None:
    tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=rate, delta=delta)


def rung(level: int, images: tf.Tensor, labels: tf.Tensor, model: ModelParams,
         train: TrainParams) -> Callable[[np.ndarray], None]:
    """A graph loop doing the first ``level + 1`` rungs of a step (see the module docstring)."""
    variables = [tf.Variable(value) for value in network.initial_values(model, train.seed)]  # the train stage's
    averages = [tf.Variable(variable) for variable in variables]
    rate, l2_rate = tf.constant(train.learning_rate), tf.constant(train.l2_rate)
    average_rate = tf.constant(1.0 - train.moving_average_decay)

    def step(indices: tf.Tensor) -> None:
        weights_1, biases_1, weights_2, biases_2 = variables
        inputs = tf.gather(images, indices)
        if level == 0:
            delta = tf.matmul(inputs, weights_1) * 1e-3  # stands in for backpropagation
            apply(weights_1, rate * 1e-6, tf.matmul(inputs, delta, transpose_a=True))  # tiny: stays finite
            return
        if level >= 4:
            for average, variable in zip(averages, variables):
                apply(average, average_rate, average - variable)
        hidden = tf.nn.relu(tf.nn.bias_add(tf.matmul(inputs, weights_1), biases_1))
        logits = tf.nn.bias_add(tf.matmul(hidden, weights_2), biases_2)
        _, logit_gradients = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
            features=logits, labels=tf.gather(labels, indices))
        delta_2 = logit_gradients / float(train.batch_size)  # d mean cross-entropy / d logits
        delta_1 = tf.raw_ops.ReluGrad(gradients=tf.matmul(delta_2, weights_2, transpose_b=True), features=hidden)
        gradients = [tf.matmul(inputs, delta_1, transpose_a=True), tf.reduce_sum(delta_1, axis=0),
                     tf.matmul(hidden, delta_2, transpose_a=True), tf.reduce_sum(delta_2, axis=0)]
        if level >= 3:
            gradients[0] += l2_rate * weights_1
            gradients[2] += l2_rate * weights_2
        for variable, gradient in list(zip(variables, gradients))[: 4 if level >= 2 else 1]:
            apply(variable, rate, gradient)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def run_steps(batches: tf.Tensor) -> tf.Tensor:
        for i in tf.range(tf.shape(batches)[0]):
            step(batches[i])
        return variables[0][0, 0]

    return lambda batches: run_steps(batches).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds of 550 steps per rung")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--raw-data", type=Path, help="IDX files to train on; default: paths.raw_data of --params")
    args = parser.parse_args(argv)

    from bench.train_speed import load_training  # the same data, or the same random stand-in

    params = load_params(args.params)
    if not params.model.hidden_units:
        parser.error("the ladder needs the seed's hidden layer: model.hidden_units is 0 in " + str(args.params))
    images, labels = load_training(args.raw_data or ROOT / params.paths.raw_data, params.data.validation_size)
    order = BatchOrder(len(labels), params.train.batch_size, params.train.seed)
    data, targets = tf.constant(images, tf.float32), tf.constant(labels, tf.int32)
    runners = [rung(level, data, targets, params.model, params.train) for level in range(len(RUNGS))]
    for runner in runners:
        runner(order.batches(0, STEPS))  # trace and warm up

    milliseconds: list[list[float]] = [[] for _ in runners]
    for round_ in range(args.rounds):
        for level in [(round_ + offset) % len(runners) for offset in range(len(runners))]:
            started = time.perf_counter()
            runners[level](order.batches(STEPS * (round_ + 1), STEPS))
            milliseconds[level].append((time.perf_counter() - started) * 1000 / STEPS)
        print(f"  round {round_ + 1} done", flush=True)

    print(f"\n{'rung':<28} {'ms/step':>8} {'added':>8} {'steps/s':>8}")
    previous = 0.0
    for name, values in zip(RUNGS, milliseconds):
        median = statistics.median(values)
        print(f"{name:<28} {median:8.3f} {median - previous:+8.3f} {1000 / median:8.0f}")
        previous = median
    return 0


if __name__ == "__main__":
    sys.exit(main())
