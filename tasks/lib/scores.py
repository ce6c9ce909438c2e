"""Test accuracies measured once and reused only while nothing they depend on has changed.

A score is the test accuracy (moving-average weights) of one model, on one test set, by one
scoring code. Its key names all three, and a recorded score is reused only when every part of
the key is equal to the one computed now:

* ``model_sha256``: the model directory's files and bytes (``tree_sha256``), hashed now;
* ``data_fingerprint``: the test files' SHA-256 (params.yaml ``data.sha256``), which the caller
  has verified against the files now;
* ``scoring_sha256``: the code that turns a model and images into an accuracy (this module,
  ``tasks/lib/model.py``, ``tasks/lib/mnist.py``), the TensorFlow version, and the batch size.

Stage evaluate records the candidate's score in ``reports/scores.json``; stage promote records
each decision in ``models/registry.json`` with the same key. So promote, judging the candidate
evaluate has just scored against a champion whose record is intact, needs no TensorFlow (6.5 s
of a 2-core machine's time, before); anything changed, and the score is measured again, as
before. Not a cache that can go stale: a key is recomputed from the bytes every time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

from tasks.lib import mnist
from tasks.lib.atomic import write_bytes_atomic
from tasks.lib.digests import tree_sha256
from tasks.lib.files import read_text_file

SCORING_BATCH = 2000  # promote's batch size; a score measured in other batches is not reused by it
_SCORING_CODE = ("scores.py", "model.py", "mnist.py")  # beside this file
KEY_FIELDS = ("model_sha256", "data_fingerprint", "scoring_sha256")
RECORD_MAX_BYTES = 1 << 20  # the record is a few hundred bytes


class UnloadableModel(RuntimeError):
    """The model cannot be loaded, so it cannot be scored (nor serve)."""


def data_fingerprint(test_sha256: Mapping[str, str]) -> str:
    """Of the test files a model is judged on, from their verified checksums."""
    return hashlib.sha256("".join(test_sha256[name] for name in sorted(test_sha256)).encode()).hexdigest()[:16]


def scoring_sha256(batch_size: int = SCORING_BATCH) -> str:
    """Of the scoring code, the TensorFlow version (read without importing it) and the batch size."""
    digest = hashlib.sha256()
    for name in _SCORING_CODE:
        digest.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes() + b"\0")
    digest.update(f"tensorflow {metadata.version('tensorflow')}; batch {batch_size}".encode())
    return digest.hexdigest()


def score_key(model_dir: Path, test_sha256: Mapping[str, str], batch_size: int = SCORING_BATCH) -> dict[str, str]:
    """What a score of ``model_dir`` on the test files of ``test_sha256`` depends on, computed now."""
    return {"model_sha256": tree_sha256(model_dir), "data_fingerprint": data_fingerprint(test_sha256),
            "scoring_sha256": scoring_sha256(batch_size)}


def test_sha256(data_sha256: Mapping[str, str]) -> dict[str, str]:
    """The checksums of the two test files, out of params.yaml ``data.sha256``."""
    return {name: data_sha256[name] for name in (mnist.TEST_IMAGES, mnist.TEST_LABELS)}


def measure(model_dir: Path, test: mnist.Split) -> float:
    """The test accuracy of the model's moving-average weights (loads TensorFlow); UnloadableModel
    when the model cannot be loaded."""
    from tasks.lib.model import ModelLoadError, load_serving_model, predict_logits

    try:
        loaded = load_serving_model(str(model_dir))
    except ModelLoadError as error:
        raise UnloadableModel(str(error)) from None
    logits = predict_logits(loaded, test.images, "serving_float", SCORING_BATCH)
    return float((logits.argmax(axis=1) == test.labels).mean())


def recorded(records: Iterable[dict], key: Mapping[str, str], accuracy_field: str) -> float | None:
    """The newest record's ``accuracy_field`` whose key equals ``key`` in every part; None if none does."""
    for record in reversed(list(records)):
        value = record.get(accuracy_field)
        if all(record.get(name) == key[name] for name in KEY_FIELDS) and isinstance(value, float):
            return value
    return None


def write_record(path: Path, key: Mapping[str, str], accuracy: float) -> None:
    """Evaluate's record of the candidate's score (``reports/scores.json``)."""
    write_bytes_atomic(path, (json.dumps({**key, "test_accuracy": accuracy}, indent=2) + "\n").encode())


def read_records(path: Path) -> list[dict]:
    """Evaluate's record as a list; none when missing, unreadable or not a small regular file (a
    FIFO there must not hang promote): the score is then measured."""
    try:
        record = json.loads(read_text_file(path, RECORD_MAX_BYTES))
    except (OSError, ValueError):  # FileProblem is a ValueError
        return []
    return [record] if isinstance(record, dict) else []
