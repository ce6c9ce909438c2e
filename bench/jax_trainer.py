"""A peer for bench/train_speed.py: the seed's training loop in JAX, written as a JAX user would.

``jax.jit`` of a ``lax.scan`` over a call's steps, ``jax.value_and_grad`` of the full loss (mean
softmax cross-entropy + ``l2_rate`` x sum(||W||^2 / 2) over the weight matrices), plain SGD
and moving-average updates: no hand-tuning. Same initial weights, batch order, staircase
learning rate and moving-average warm-up as the train stage (tests/test_bench.py checks it
trains what the train stage trains, to float32 rounding).

JAX is not a dependency of the pipeline: ``pip install -e '.[bench]'`` adds it, and
bench/train_speed.py leaves this row out when JAX is missing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tasks.lib.params import TrainParams
from tasks.lib.schedules import learning_rates, moving_average_decays


def _logits(variables: Sequence[jax.Array], images: jax.Array, activation: str) -> jax.Array:
    outputs = images
    pairs = list(zip(variables[0::2], variables[1::2]))
    for weights, biases in pairs[:-1]:
        outputs = outputs @ weights + biases
        outputs = jax.nn.relu(outputs) if activation == "relu" else outputs
    weights, biases = pairs[-1]
    return outputs @ weights + biases


class JaxTrainer:
    def __init__(self, initial: Sequence[np.ndarray], activation: str, train: TrainParams, images: np.ndarray,
                 labels: np.ndarray, decay_steps: int) -> None:
        self.weights = [jnp.asarray(value) for value in initial]
        self.averages = [jnp.asarray(value) for value in initial]
        self.images, self.labels = jax.device_put(images), jax.device_put(labels.astype(np.int32))
        self.activation, self.train, self.decay_steps = activation, train, decay_steps
        self.step = 0
        self._run = jax.jit(self._scan)

    def _loss(self, variables: list[jax.Array], images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        log_probabilities = jax.nn.log_softmax(_logits(variables, images, self.activation))
        cross_entropy = -jnp.mean(jnp.take_along_axis(log_probabilities, labels[:, None], axis=1))
        penalty = sum(jnp.sum(matrix**2) / 2 for matrix in variables[0::2])
        return cross_entropy + self.train.l2_rate * penalty, cross_entropy

    def _scan(self, weights: list[jax.Array], averages: list[jax.Array], images: jax.Array, labels: jax.Array,
              batches: jax.Array, learning_rates: jax.Array, decays: jax.Array) -> tuple:
        def step(carry: tuple, inputs: tuple) -> tuple:
            weights, averages = carry
            indices, learning_rate, decay = inputs
            gradients, cross_entropy = jax.grad(self._loss, has_aux=True)(weights, images[indices], labels[indices])
            weights = [value - learning_rate * gradient for value, gradient in zip(weights, gradients)]
            averages = [average - (1 - decay) * (average - value) for average, value in zip(averages, weights)]
            return (weights, averages), cross_entropy

        (weights, averages), losses = jax.lax.scan(step, (weights, averages), (batches, learning_rates, decays))
        return weights, averages, losses

    def run_steps(self, batches: np.ndarray) -> np.ndarray:
        """One step per row of ``batches``; each step's mean cross-entropy. Each distinct number
        of rows compiles once."""
        steps = np.arange(self.step, self.step + len(batches))
        rates, decays = learning_rates(self.train, self.decay_steps, steps), moving_average_decays(self.train, steps)
        self.weights, self.averages, losses = self._run(
            self.weights, self.averages, self.images, self.labels, batches, rates, decays)
        self.step += len(batches)
        return np.asarray(losses)

    def state(self) -> dict[str, np.ndarray]:
        state = {f"weight_{i}": np.asarray(value) for i, value in enumerate(self.weights)}
        state.update({f"average_{i}": np.asarray(value) for i, value in enumerate(self.averages)})
        return state
