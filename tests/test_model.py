"""tasks/lib/model.py: shapes, initialisation, and the exported serving model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tasks.lib import model as network
from tasks.lib.params import ModelParams

from .conftest import with_default_threads


@pytest.mark.parametrize(("hidden", "shapes"), [(32, [(784, 32), (32,), (32, 10), (10,)]), (0, [(784, 10), (10,)])])
def test_layer_shapes_and_logits(hidden: int, shapes: list[tuple[int, ...]]) -> None:
    model = ModelParams(hidden_units=hidden, activation="relu", init_stddev=0.1)
    assert network.layer_shapes(model) == shapes
    values = network.initial_values(model, seed=3)
    logits = network.inference(tf.zeros((5, 784)), values, model.activation)
    assert logits.shape == (5, 10)


def test_initialisation_is_seeded_truncated_normal_with_zero_biases() -> None:
    model = ModelParams(hidden_units=500, activation="relu", init_stddev=0.1)
    first, again, other = (network.initial_values(model, seed) for seed in (1, 1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    weights = first[0].numpy()
    assert np.abs(weights).max() <= 0.2 + 1e-6  # truncated at two standard deviations
    assert 0.08 < weights.std() < 0.095  # a normal truncated at 2 sigma has std 0.88 sigma
    assert not first[1].numpy().any() and not first[3].numpy().any()


def test_linear_activation_is_linear() -> None:
    model = ModelParams(hidden_units=16, activation="linear", init_stddev=0.1)
    values = network.initial_values(model, seed=0)
    x = tf.random.stateless_uniform((4, 784), seed=[0, 1])
    doubled = network.inference(2 * x, values, "linear")
    assert np.allclose(doubled.numpy(), 2 * network.inference(x, values, "linear").numpy(), atol=1e-5)


def test_weight_matrices_are_the_rank_two_variables() -> None:
    model = ModelParams(hidden_units=8, activation="relu", init_stddev=0.1)
    variables = [tf.Variable(v) for v in network.initial_values(model, 0)]
    assert [tuple(v.shape) for v in network.weight_matrices(variables)] == [(784, 8), (8, 10)]


def test_exported_model_serves_uint8_and_float_images(tmp_path: Path) -> None:
    model = ModelParams(hidden_units=8, activation="relu", init_stddev=0.1)
    averaged, raw = network.initial_values(model, 0), network.initial_values(model, 1)
    network.export(network.ServingModel(averaged, raw, "relu"), str(tmp_path / "m"))
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    assert set(loaded.signatures) == {"serving_default", "serving_float", "raw_weights"}
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    from_uint8 = loaded.signatures["serving_default"](images=tf.constant(pixels))
    scaled = tf.constant(pixels.reshape(3, 784).astype(np.float32) / 255)
    from_float = loaded.signatures["serving_float"](images=scaled)
    assert np.allclose(from_uint8["probabilities"], from_float["probabilities"], atol=1e-6)
    assert np.allclose(from_uint8["probabilities"].numpy().sum(axis=1), 1, atol=1e-5)
    expected = network.inference(scaled, averaged, "relu").numpy()
    assert np.allclose(from_float["logits"], expected, atol=1e-5)
    raw_logits = loaded.signatures["raw_weights"](images=scaled)["logits"].numpy()
    assert np.allclose(raw_logits, network.inference(scaled, raw, "relu").numpy(), atol=1e-5)


def test_export_is_byte_reproducible(tmp_path: Path) -> None:
    """Two processes exporting the same weights write identical bytes (TF's random fingerprint
    UUID is replaced by one derived from the model), so DVC sees identical models as identical."""
    import subprocess
    import sys

    script = ("import sys\nfrom tasks.lib import model as m\nfrom tasks.lib.params import ModelParams\n"
              "p = ModelParams(hidden_units=8, activation='relu', init_stddev=0.1)\n"
              "v = m.initial_values(p, 0)\nm.export(m.ServingModel(v, v, 'relu'), sys.argv[1])\n")
    root = Path(__file__).resolve().parents[1]
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], cwd=root, check=True, capture_output=True,
                       env=with_default_threads(dict(os.environ)))  # as the train stage runs
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert Path("fingerprint.pb") in files
    for relative in files:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative


def _files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def test_export_bytes_depend_only_on_the_weights(tmp_path: Path) -> None:
    """TensorFlow numbers traced functions with a process-wide counter: a process that traced
    more before exporting (a resumed training run, say) must still write the same bytes."""
    model = ModelParams(hidden_units=8, activation="relu", init_stddev=0.1)
    averaged, raw = network.initial_values(model, 0), network.initial_values(model, 1)
    network.export(network.ServingModel(averaged, raw, "relu"), str(tmp_path / "first"))
    for size in range(1, 8):  # unrelated tracing moves the counter on
        tf.function(lambda x: x * 2)(tf.zeros([size]))
    network.export(network.ServingModel(averaged, raw, "relu"), str(tmp_path / "second"))
    first, second = _files(tmp_path / "first"), _files(tmp_path / "second")
    assert set(first) == set(second) and "saved_model.pb" in first and "fingerprint.pb" in first
    for name in first:
        assert first[name] == second[name], name
    network.export(network.ServingModel(raw, averaged, "relu"), str(tmp_path / "other"))
    assert _files(tmp_path / "other")["variables/variables.data-00000-of-00001"] != first[
        "variables/variables.data-00000-of-00001"]  # other weights, other bytes
    loaded = network.load_serving_model(str(tmp_path / "second"))  # the rewritten model still serves
    images = tf.random.stateless_uniform((2, 784), seed=[0, 2])
    logits = loaded.signatures["serving_float"](images=images)["logits"].numpy()
    assert np.allclose(logits, network.inference(images, averaged, "relu").numpy(), atol=1e-5)
    raw_logits = loaded.signatures["raw_weights"](images=images)["logits"].numpy()
    assert np.allclose(raw_logits, network.inference(images, raw, "relu").numpy(), atol=1e-5)
