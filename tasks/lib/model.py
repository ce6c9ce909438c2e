"""The forward pass (the seed's ``mnist_inference``) and the exported serving model.

One definition of the network serves training, evaluation and serving:
784 inputs -> ``hidden_units`` (ReLU or linear) -> 10 logits, or 784 -> 10 when
``hidden_units`` is 0. Weights start truncated-normal, biases at zero.

The exported model is a TF SavedModel whose signatures are

* ``serving_default``: uint8 images ``(n, 28, 28)`` (raw pixels, as in IDX files or PNGs)
* ``serving_float``:   float32 images ``(n, 784)`` with pixels scaled to [0, 1]

both answering ``probabilities`` (n, 10), ``classes`` (n,) and ``logits`` from the moving-
average (EMA) weights, and ``raw_weights``: the same for the raw, un-averaged weights, so
evaluation can report both.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.lib.tf_loader import tf  # before anything of TensorFlow: it loads quietly there

# isort: split
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tensorflow.core.protobuf import fingerprint_pb2, saved_model_pb2
from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting  # TF's own fingerprint hashes

from tasks.lib.digests import MAX_MODEL_BYTES
from tasks.lib.files import FileProblem, check_tree, environment_error
from tasks.lib.params import ModelParams

INPUT_SIZE = 784
NUM_CLASSES = 10


def layer_shapes(model: ModelParams) -> list[tuple[int, ...]]:
    """Shapes of [W1, b1, W2, b2], or [W, b] without a hidden layer."""
    sizes = [INPUT_SIZE, model.hidden_units, NUM_CLASSES] if model.hidden_units else [INPUT_SIZE, NUM_CLASSES]
    shapes: list[tuple[int, ...]] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        shapes += [(fan_in, fan_out), (fan_out,)]
    return shapes


def initial_values(model: ModelParams, seed: int) -> list[tf.Tensor]:
    """Truncated-normal weights (stddev ``init_stddev``) and zero biases, a pure function of seed."""
    values = []
    for index, shape in enumerate(layer_shapes(model)):
        if len(shape) == 2:
            values.append(tf.random.stateless_truncated_normal(shape, seed=[seed, index], stddev=model.init_stddev))
        else:
            values.append(tf.zeros(shape))
    return values


def layers(variables: Sequence[tf.Tensor]) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """(weights, biases) of each layer, input layer first."""
    return list(zip(variables[0::2], variables[1::2]))


def inference(images: tf.Tensor, variables: Sequence[tf.Tensor], activation: str) -> tf.Tensor:
    """Logits of float images (n, 784): the seed's mnist_inference."""
    hidden = images
    for weights, biases in layers(variables)[:-1]:
        hidden = tf.nn.bias_add(tf.matmul(hidden, weights), biases)
        hidden = tf.nn.relu(hidden) if activation == "relu" else hidden
    weights, biases = layers(variables)[-1]
    return tf.nn.bias_add(tf.matmul(hidden, weights), biases)


def weight_matrices(variables: Sequence[tf.Variable]) -> list[tf.Variable]:
    """The variables L2 regularisation applies to: the weight matrices, not the biases."""
    return [variable for variable in variables if len(variable.shape) == 2]


class ServingModel(tf.Module):
    """What `models/candidate/` and `models/production/<N>/` hold."""

    def __init__(self, averaged: Sequence[tf.Tensor], raw: Sequence[tf.Tensor], activation: str) -> None:
        super().__init__(name="mnist_mlp")
        self.averaged = [tf.Variable(value, trainable=False) for value in averaged]
        self.raw = [tf.Variable(value, trainable=False) for value in raw]
        self.activation = activation

    def _answer(self, images: tf.Tensor, variables: Sequence[tf.Variable]) -> dict[str, tf.Tensor]:
        logits = inference(images, variables, self.activation)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits), "classes": tf.argmax(logits, axis=1)}

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name="images")])
    def serve_uint8(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        flat = tf.reshape(tf.cast(images, tf.float32) / 255.0, [-1, INPUT_SIZE])
        return self._answer(flat, self.averaged)

    @tf.function(input_signature=[tf.TensorSpec([None, INPUT_SIZE], tf.float32, name="images")])
    def serve_float(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._answer(images, self.averaged)

    @tf.function(input_signature=[tf.TensorSpec([None, INPUT_SIZE], tf.float32, name="images")])
    def serve_raw(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._answer(images, self.raw)

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        return {
            "serving_default": self.serve_uint8.get_concrete_function(),
            "serving_float": self.serve_float.get_concrete_function(),
            "raw_weights": self.serve_raw.get_concrete_function(),
        }


def export(model: ServingModel, directory: str) -> None:
    """Save ``model`` as a SavedModel whose bytes depend only on its weights and this code.

    TensorFlow names each traced function after a process-wide counter
    (``__inference_serve_float_189``) and writes a random UUID into ``fingerprint.pb``, so the
    same weights saved by a process that had traced more before would differ in bytes, and DVC
    would see a changed model. The names are rewritten to their order of creation within this
    export and the fingerprint is derived from the rewritten files."""
    try:
        tf.saved_model.save(model, directory, signatures=model.signatures())
    except tf.errors.OpError as error:  # TensorFlow's own writes: a full disk is an OpError there
        raise environment_error(str(error), Path(directory)) or error from None
    _canonicalise_saved_model(Path(directory) / "saved_model.pb")
    _make_fingerprint_reproducible(Path(directory))


_COUNTER_SUFFIX = re.compile(r"^(.*?)_(\d+)$")


def _canonical_names(saved_model: saved_model_pb2.SavedModel) -> dict[str | bytes, str | bytes]:
    """Counter-numbered names -> names numbered by rank: functions, and the numeric placeholder
    names TensorFlow gives a signature wrapper's captured variables (``_user_specified_name``)."""
    renames: dict[str | bytes, str | bytes] = {}
    library = [function for meta in saved_model.meta_graphs for function in meta.graph_def.library.function]
    names = [function.signature.name for function in library]
    numbered = sorted((int(match[2]), name, match[1]) for name in names if (match := _COUNTER_SUFFIX.match(name)))
    renames.update({name: f"{stem}_{rank}" for rank, (_, name, stem) in enumerate(numbered)})
    captured = {attr.s for function in library for arguments in function.arg_attr.values()
                for key, attr in arguments.attr.items() if key == "_user_specified_name" and attr.s.isdigit()}
    renames.update({value: str(rank).encode() for rank, value in enumerate(sorted(captured, key=int))})
    return renames


def _rename_everywhere(message: Message, renames: dict) -> None:
    """Replace every string or bytes field (and map key) of ``message`` found in ``renames``."""
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            _rename_map(value, field.message_type.fields_by_name["value"].type, renames)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                _rename_everywhere(item, renames)
        elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            if field.is_repeated:
                value[:] = [renames.get(item, item) for item in value]
            elif value in renames:
                setattr(message, field.name, renames[value])


def _rename_map(entries: Any, value_type: int, renames: dict) -> None:
    items = list(entries.items())
    if value_type == FieldDescriptor.TYPE_MESSAGE:
        for _, item in items:
            _rename_everywhere(item, renames)
        items = [(key, item.SerializeToString(deterministic=True)) for key, item in items]
        entries.clear()
        for key, data in items:
            entries[renames.get(key, key)].ParseFromString(data)
    else:
        entries.clear()
        for key, item in items:
            entries[renames.get(key, key)] = renames.get(item, item)


def _canonicalise_saved_model(path: Path) -> None:
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    _rename_everywhere(saved_model, _canonical_names(saved_model))
    for meta in saved_model.meta_graphs:  # the library's order follows the old names: sort it
        library = meta.graph_def.library.function
        ordered = [function.SerializeToString(deterministic=True)
                   for function in sorted(library, key=lambda function: function.signature.name)]
        del library[:]
        for data in ordered:
            library.add().ParseFromString(data)
    path.write_bytes(saved_model.SerializeToString(deterministic=True))


def _make_fingerprint_reproducible(directory: Path) -> None:
    """Recompute fingerprint.pb from the rewritten saved_model.pb (TensorFlow's own hashes), and
    replace its random UUID with one derived from those hashes."""
    path = directory / "fingerprint.pb"
    if not path.exists():
        return
    fingerprint = fingerprint_pb2.FingerprintDef.FromString(fingerprinting.CreateFingerprintDef(str(directory)))
    fingerprint.uuid = ""
    digest = hashlib.sha256(fingerprint.SerializeToString(deterministic=True)).hexdigest()
    fingerprint.uuid = str(int(digest[:32], 16))
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


class ModelLoadError(RuntimeError):
    """A model directory is missing, unreadable, or lacks the expected signatures."""


REQUIRED_SIGNATURES = ("serving_default", "serving_float", "raw_weights")


def load_serving_model(directory: str) -> tf.Module:
    """Load an exported model and check its signatures. A SavedModel holds graphs and tensors
    only, so loading it runs no Python from the file (unlike pickle or Keras lambda layers).
    Every entry below ``directory`` must be a regular file or a directory, within a size cap,
    before TensorFlow opens any (a FIFO there would block its reader for ever)."""
    try:
        check_tree(Path(directory), MAX_MODEL_BYTES)
    except FileProblem as error:
        raise ModelLoadError(f"cannot load the model in {directory}: {error}") from None
    try:
        loaded = tf.saved_model.load(str(directory))
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise ModelLoadError(f"cannot load the model in {directory}: {str(error).splitlines()[0]}") from None
    missing = [name for name in REQUIRED_SIGNATURES if name not in loaded.signatures]
    if missing:
        raise ModelLoadError(f"the model in {directory} lacks the signatures {missing}")
    return loaded


def predict_logits(loaded: tf.Module, images: np.ndarray, signature: str = "serving_float",
                   batch_size: int = 2000) -> np.ndarray:
    """Logits of float images (n, 784) through one signature, in batches."""
    function = loaded.signatures[signature]
    outputs = [function(images=tf.constant(images[start : start + batch_size]))["logits"].numpy()
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, NUM_CLASSES), np.float32)
