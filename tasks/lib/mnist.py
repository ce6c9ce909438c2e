"""MNIST on disk: the IDX file format, the data-validation gate and the train/validation split.

The four canonical files (``train-images-idx3-ubyte`` ...) are big-endian IDX: a magic number
(2051 for images, 2049 for labels), the dimensions, then raw uint8 values. Later stages load
them with :func:`load_split`, which scales pixels to [0, 1] as the seed does.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.lib.files import FileProblem, check_regular_file, open_regular_file

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
IMAGE_SIDE = 28
NUM_CLASSES = 10
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
MAX_IDX_HEADER = 4 + 4 * 255  # magic number, then up to 255 dimensions
MAX_DATA_FILE_BYTES = 256 << 20  # MNIST's largest file is 47 MB


class DataError(ValueError):
    """A dataset file is malformed or fails the validation gate."""


@dataclass(frozen=True)
class Split:
    """Images as float32 in [0, 1] with shape (n, 784), labels as int32 in 0..9."""

    images: np.ndarray
    labels: np.ndarray


def _opened(path: Path, max_bytes: int = MAX_DATA_FILE_BYTES):
    """``path`` opened as a regular data file (a FIFO or a device is a DataError, never read)."""
    try:
        return open_regular_file(Path(path), max_bytes)
    except FileProblem as error:
        raise DataError(str(error)) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with _opened(path) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array: images (n, 28, 28) or labels (n,)."""
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise DataError(f"IDX needs uint8 labels (n,) or images (n, h, w), got {array.dtype} {array.shape}")
    magic = LABEL_MAGIC if array.ndim == 1 else IMAGE_MAGIC
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def decode_idx_header(header: bytes, total_size: int, name: str = "IDX data") -> tuple[tuple[int, ...], int]:
    """(shape, header size) from the first bytes of an IDX file of ``total_size`` bytes; the
    dimensions must be non-negative and account for exactly the bytes that follow."""
    if len(header) < 8:
        raise DataError(f"{name}: {total_size} bytes is too short for an IDX header")
    magic = int.from_bytes(header[:4], "big")
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise DataError(f"{name}: magic number {magic} is neither {IMAGE_MAGIC} nor {LABEL_MAGIC}")
    header_size = 4 + 4 * (magic & 0xFF)  # the low byte is the number of dimensions
    if len(header) < header_size:
        raise DataError(f"{name}: {total_size} bytes is too short for an IDX header")
    shape = tuple(int(v) for v in np.frombuffer(header[4:header_size], dtype=">i4"))
    if min(shape) < 0:
        raise DataError(f"{name}: header says {shape}; dimensions cannot be negative")
    expected = header_size + math.prod(shape)  # Python integers: no overflow on lying headers
    if total_size != expected:
        raise DataError(f"{name}: header says {shape} ({expected} bytes) but the file has {total_size} bytes")
    return shape, header_size


def decode_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes (uint8 payload only), checking the header against the payload size."""
    shape, header_size = decode_idx_header(data[:MAX_IDX_HEADER], len(data), name)
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_idx_header(path: Path) -> tuple[int, ...]:
    """The shape an IDX file declares, checked against the file's size, reading only the header."""
    with _opened(path, max_bytes=1 << 62) as stream:  # the header is read, and judges the size
        return decode_idx_header(stream.read(MAX_IDX_HEADER), os.fstat(stream.fileno()).st_size, str(path))[0]


def read_idx(path: Path) -> np.ndarray:
    read_idx_header(path)  # a header that lies about the size fails before the file is read
    with _opened(path) as stream:  # the size checked against the header above: read that much
        return decode_idx(stream.read(os.fstat(stream.fileno()).st_size), str(path))


def verify_checksums(directory: Path, expected: Mapping[str, str]) -> None:
    """Check each file named in ``expected`` (params.yaml ``data.sha256``) against its SHA-256.

    DVC takes a file whose size and modification time are unchanged to be unchanged, so a byte
    altered in place goes unseen by `dvc status` and `dvc repro`. Hashing all of MNIST (55 MB)
    takes about 40 ms, so every stage that reads the data checks it first."""
    directory = Path(directory)
    restore = (f"restore it with `dvc checkout --relink {directory}`, or download it again with "
               f"`dvc repro --force download`")
    for name, digest in expected.items():
        path = directory / name
        if not path.exists():
            raise DataError(f"{path} is missing: {restore}")
        try:
            check_regular_file(path, MAX_DATA_FILE_BYTES)
        except FileProblem as error:
            raise DataError(f"{error}: {restore}") from None
        actual = sha256_of(path)
        if actual != digest:
            raise DataError(f"{path} was changed or damaged (SHA-256 {actual[:12]}..., data.sha256 in params.yaml "
                            f"says {digest[:12]}...): {restore}")


def _check_pair(images: np.ndarray, labels: np.ndarray, name: str, counts: list[int]) -> None:
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{name} images have shape {images.shape}, expected (n, 28, 28)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{name}: {len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{name} labels must be 0..9, found {int(labels.max())}")
    found = np.bincount(labels, minlength=NUM_CLASSES).tolist()
    if found != list(counts):
        raise DataError(f"{name} class counts {found} differ from the expected {list(counts)}")


def validate_dataset(directory: Path, train_counts: list[int], test_counts: list[int]) -> None:
    """The data-validation gate: 28x28 uint8 images, labels 0..9 and the expected class counts."""
    _check_pair(read_idx(directory / TRAIN_IMAGES), read_idx(directory / TRAIN_LABELS), "train", train_counts)
    _check_pair(read_idx(directory / TEST_IMAGES), read_idx(directory / TEST_LABELS), "test", test_counts)


def _as_split(images: np.ndarray, labels: np.ndarray) -> Split:
    flat = images.reshape(len(images), IMAGE_SIDE * IMAGE_SIDE).astype(np.float32)
    flat /= 255.0  # in place: the training images are 172 MB as float32, and one copy is enough
    return Split(images=flat, labels=labels.astype(np.int32))


def load_split(directory: Path, split: str, validation_size: int) -> Split:
    """``train`` (after the validation images), ``validation`` (the first ``validation_size``
    training images, as in the seed) or ``test``."""
    directory = Path(directory)
    if split == "test":
        return _as_split(read_idx(directory / TEST_IMAGES), read_idx(directory / TEST_LABELS))
    images, labels = read_idx(directory / TRAIN_IMAGES), read_idx(directory / TRAIN_LABELS)
    if split == "validation":
        return _as_split(images[:validation_size], labels[:validation_size])
    if split == "train":
        return _as_split(images[validation_size:], labels[validation_size:])
    raise ValueError(f"unknown split {split!r}: expected train, validation or test")
