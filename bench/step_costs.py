"""What each part of a training step costs, in TensorFlow's graph executor and under XLA.

A ladder of training loops over real MNIST batches (the seed's 784-500-10 network, batch size,
learning rate, L2 rate and average decay from ``params.yaml``; the learning rate is held
constant), each doing a bit more of the seed's step than the rung before:

1. ``W1 matmuls + W1 update``: ``x @ W1``, W1's gradient matmul, W1's SGD update;
2. ``+ real gradients``: the whole forward and backward pass (biases, ReLU, second layer,
   softmax cross-entropy), still updating only W1;
3. ``+ bias and W2 updates``: every variable updated;
4. ``+ L2``: the L2 gradient added to both weight matrices;
5. ``+ moving average``: every variable's average updated every step, as in the seed.

Rung 5 is the seed's step, written plainly. Every rung runs twice: as a ``tf.function`` graph
loop updating variables in place (how bench/graph_trainer.py works), and as an XLA-compiled
loop carrying the values as loop tensors (how the train stage's ``tasks.trainer.Trainer``
works). The loops are timed in rotating order for ``--rounds`` rounds of 550 steps. The output
is the median ms per step of each rung in each executor and what it adds to the rung before:
in the graph executor every pass over W1 (the L2 term, the average) costs its own time; XLA
fuses them into the passes the update makes anyway.

    python bench/step_costs.py [--rounds 8] [--params params.yaml] [--raw-data data/raw]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tasks import model as network  # noqa: E402
from tasks.params import Params, load_params  # noqa: E402
from tasks.train import BatchOrder  # noqa: E402

RUNGS = ["W1 matmuls + W1 update", "+ real gradients", "+ bias and W2 updates", "+ L2", "+ moving average"]
EXECUTORS = ["graph", "xla"]
STEPS = 550

Update = tuple[int, tf.Tensor, tf.Tensor]  # (which, rate, delta): value[which] -= rate * delta


def step_updates(level: int, values: Sequence, averages: Sequence, images: tf.Tensor, labels: tf.Tensor,
                 indices: tf.Tensor, params: Params) -> tuple[list[Update], list[Update]]:
    """The updates the first ``level + 1`` rungs make in one step: (to the averages, to the
    variables). Everything is computed from the values at the start of the step."""
    train = params.train
    weights_1, biases_1, weights_2, biases_2 = values
    inputs = tf.gather(images, indices)
    if level == 0:
        delta = tf.matmul(inputs, weights_1) * 1e-3  # stands in for backpropagation
        return [], [(0, train.learning_rate * 1e-6, tf.matmul(inputs, delta, transpose_a=True))]  # tiny: stays finite
    average_rate = 1.0 - train.moving_average_decay
    average_updates = [(k, average_rate, averages[k] - values[k]) for k in range(4)] if level >= 4 else []
    hidden = tf.nn.relu(tf.nn.bias_add(tf.matmul(inputs, weights_1), biases_1))
    logits = tf.nn.bias_add(tf.matmul(hidden, weights_2), biases_2)
    _, logit_gradients = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
        features=logits, labels=tf.gather(labels, indices))
    delta_2 = logit_gradients / float(train.batch_size)  # d mean cross-entropy / d logits
    delta_1 = tf.raw_ops.ReluGrad(gradients=tf.matmul(delta_2, weights_2, transpose_b=True), features=hidden)
    gradients = [tf.matmul(inputs, delta_1, transpose_a=True), tf.reduce_sum(delta_1, axis=0),
                 tf.matmul(hidden, delta_2, transpose_a=True), tf.reduce_sum(delta_2, axis=0)]
    if level >= 3:
        gradients[0] += train.l2_rate * weights_1
        gradients[2] += train.l2_rate * weights_2
    updated = range(4) if level >= 2 else range(1)
    return average_updates, [(k, train.learning_rate, gradients[k]) for k in updated]


def graph_rung(level: int, images: tf.Tensor, labels: tf.Tensor, params: Params) -> Callable[[np.ndarray], None]:
    """Rung ``level`` as a graph loop over variables, each update one in-place kernel."""
    variables = [tf.Variable(value) for value in network.initial_values(params.model, params.train.seed)]
    averages = [tf.Variable(variable) for variable in variables]

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def run_steps(batches: tf.Tensor) -> tf.Tensor:
        for i in tf.range(tf.shape(batches)[0]):
            average_updates, updates = step_updates(level, variables, averages, images, labels, batches[i], params)
            for targets, changes in ((averages, average_updates), (variables, updates)):
                for which, rate, delta in changes:
                    tf.raw_ops.ResourceApplyGradientDescent(var=targets[which].handle, alpha=rate, delta=delta)
        return variables[0][0, 0]

    return lambda batches: run_steps(batches).numpy()


def xla_rung(level: int, images: tf.Tensor, labels: tf.Tensor, params: Params) -> Callable[[np.ndarray], None]:
    """Rung ``level`` as an XLA-compiled loop carrying the values (state in, state out)."""
    state = {"values": network.initial_values(params.model, params.train.seed)}
    state["averages"] = list(state["values"])

    @tf.function(jit_compile=True)
    def run_steps(images: tf.Tensor, labels: tf.Tensor, batches: tf.Tensor, values: list, averages: list) -> tuple:
        def step(i: tf.Tensor, values: list, averages: list) -> tuple:
            average_updates, updates = step_updates(level, values, averages, images, labels, batches[i], params)
            values, averages = list(values), list(averages)
            for targets, changes in ((averages, average_updates), (values, updates)):
                for which, rate, delta in changes:
                    targets[which] = targets[which] - rate * delta
            return i + 1, values, averages

        _, values, averages = tf.while_loop(lambda i, *_: i < tf.shape(batches)[0], step, (0, values, averages))
        return values, averages

    def run(batches: np.ndarray) -> None:
        values, averages = run_steps(images, labels, tf.constant(batches), state["values"], state["averages"])
        state["values"], state["averages"] = values, averages
        values[0].numpy()

    return run


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
    runners = [make(level, data, targets, params) for make in (graph_rung, xla_rung) for level in range(len(RUNGS))]
    for runner in runners:
        runner(order.batches(0, STEPS))  # trace, compile and warm up

    milliseconds: list[list[float]] = [[] for _ in runners]
    for round_ in range(args.rounds):
        for index in [(round_ + offset) % len(runners) for offset in range(len(runners))]:
            started = time.perf_counter()
            runners[index](order.batches(STEPS * (round_ + 1), STEPS))
            milliseconds[index].append((time.perf_counter() - started) * 1000 / STEPS)
        print(f"  round {round_ + 1} done", flush=True)
    print_table([statistics.median(values) for values in milliseconds])
    return 0


def print_table(medians: list[float]) -> None:
    """One line per rung: per executor, median ms/step, what the rung adds, steps/s."""
    print(f"\n{'rung':<28}" + "".join(f" {executor + ' ms/step':>14} {'added':>8} {'steps/s':>8}"
                                     for executor in EXECUTORS))
    for level, name in enumerate(RUNGS):
        line = f"{name:<28}"
        for executor in range(len(EXECUTORS)):
            median = medians[executor * len(RUNGS) + level]
            previous = medians[executor * len(RUNGS) + level - 1] if level else 0.0
            line += f" {median:14.3f} {median - previous:+8.3f} {1000 / median:8.0f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
