"""tasks/lib/mnist.py: IDX round-trip, header checks, the validation gate and the split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tasks.lib import mnist

from .conftest import TRAIN_SIZE, class_counts, synthetic_arrays, write_synthetic


@pytest.mark.parametrize("shape", [(5, 28, 28), (7,), (0, 28, 28)])
def test_idx_round_trip(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, size=shape).astype(np.uint8)
    decoded = mnist.decode_idx(mnist.encode_idx(array))
    assert decoded.shape == shape and np.array_equal(decoded, array)


def test_idx_header_matches_the_canonical_format() -> None:
    encoded = mnist.encode_idx(np.zeros((2, 28, 28), np.uint8))
    assert encoded[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c".replace(" ", ""))


def test_truncated_or_foreign_files_are_rejected() -> None:
    encoded = mnist.encode_idx(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(mnist.DataError, match="header says"):
        mnist.decode_idx(encoded[:-1])
    with pytest.raises(mnist.DataError, match="magic number"):
        mnist.decode_idx(b"\x00\x00\x09\x03" + encoded[4:])
    with pytest.raises(mnist.DataError, match="too short"):
        mnist.decode_idx(b"\x00")
    with pytest.raises(mnist.DataError, match="uint8"):
        mnist.encode_idx(np.zeros((2, 2), np.float32))


def test_validation_gate(tmp_path: Path) -> None:
    write_synthetic(tmp_path)
    counts = class_counts()
    mnist.validate_dataset(tmp_path, counts["train"], counts["test"])
    wrong = list(counts["train"])
    wrong[3] += 1
    with pytest.raises(mnist.DataError, match="train class counts"):
        mnist.validate_dataset(tmp_path, wrong, counts["test"])
    labels = synthetic_arrays()["t10k-labels-idx1-ubyte"].copy()
    labels[0] = 11
    (tmp_path / mnist.TEST_LABELS).write_bytes(mnist.encode_idx(labels))
    with pytest.raises(mnist.DataError, match="labels must be 0..9"):
        mnist.validate_dataset(tmp_path, counts["train"], counts["test"])


def test_split_takes_the_first_images_for_validation(tmp_path: Path) -> None:
    write_synthetic(tmp_path)
    arrays = synthetic_arrays()
    validation = mnist.load_split(tmp_path, "validation", 100)
    train = mnist.load_split(tmp_path, "train", 100)
    assert validation.images.shape == (100, 784) and train.images.shape == (TRAIN_SIZE - 100, 784)
    assert validation.images.dtype == np.float32 and train.images.min() >= 0.0 and train.images.max() <= 1.0
    assert np.array_equal(validation.labels, arrays["train-labels-idx1-ubyte"][:100])
    assert np.allclose(train.images[0], arrays["train-images-idx3-ubyte"][100].reshape(-1) / 255.0)
    with pytest.raises(ValueError, match="unknown split"):
        mnist.load_split(tmp_path, "holdout", 100)


def _tamper_in_place(path: Path, offset: int) -> None:
    """Change one byte and put the size and modification time back: what DVC cannot see."""
    before = path.stat()
    content = bytearray(path.read_bytes())
    content[offset] ^= 0x01
    path.write_bytes(bytes(content))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


def test_verify_checksums_names_the_file_and_the_command(tmp_path: Path) -> None:
    checksums = write_synthetic(tmp_path)
    mnist.verify_checksums(tmp_path, checksums)
    _tamper_in_place(tmp_path / mnist.TRAIN_LABELS, 100)
    with pytest.raises(mnist.DataError) as caught:
        mnist.verify_checksums(tmp_path, checksums)
    message = str(caught.value)
    assert f"{tmp_path / mnist.TRAIN_LABELS} was changed or damaged" in message
    assert f"`dvc checkout --relink {tmp_path}`" in message and "`dvc repro --force download`" in message
    (tmp_path / mnist.TEST_IMAGES).unlink()
    with pytest.raises(mnist.DataError, match=f"{mnist.TEST_IMAGES} is missing"):
        mnist.verify_checksums(tmp_path, {mnist.TEST_IMAGES: checksums[mnist.TEST_IMAGES]})


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ([mnist.IMAGE_MAGIC, -1, 28, 28], "dimensions cannot be negative"),
        ([mnist.IMAGE_MAGIC, 2**31 - 1, 2**31 - 1, 2**31 - 1], "header says"),  # 10^28 bytes promised
        ([mnist.IMAGE_MAGIC, 3, 28], "too short for an IDX header"),
    ],
)
def test_lying_headers_are_refused_before_the_file_is_read(tmp_path: Path, header: list[int], message: str) -> None:
    path = tmp_path / "images.idx"
    payload = bytes(3 * 28 * 28) if len(header) == 4 else b""
    path.write_bytes(np.array(header, dtype=">i4").tobytes() + payload)
    with pytest.raises(mnist.DataError, match=message):
        mnist.read_idx_header(path)
    with pytest.raises(mnist.DataError, match=message):
        mnist.read_idx(path)
    with pytest.raises(mnist.DataError, match=message):
        mnist.decode_idx(path.read_bytes())
