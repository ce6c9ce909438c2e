"""tasks/commands/predict.py: the production model classifies digit images a user hands it."""

from __future__ import annotations

import os
import shutil
import struct
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.commands import predict
from tasks.lib import mnist
from tasks.lib.params import Paths, parse_params
from tasks.train import train_model

from .conftest import make_params_document, synthetic_arrays


@pytest.fixture
def project(tmp_path: Path, synthetic_source: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    document = make_params_document(synthetic_source)
    params = parse_params(document)
    paths = replace(Paths.under(tmp_path), raw_data=synthetic_source, candidate=tmp_path / "candidate")
    train_model(params.model, params.train, paths, validation_size=100, data_sha256=params.data.sha256)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _serve(project: Path) -> None:
    """Put the candidate where predict looks (promote's own publishing is tested in test_production)."""
    shutil.copytree(project / "candidate", project / "models" / "production" / "1")


def test_predict_classifies_a_png_and_an_idx_file(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _serve(project)
    arrays = synthetic_arrays()
    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    Image.fromarray(images[0]).save(project / "digit.png")
    (project / "three.idx").write_bytes(mnist.encode_idx(images[:3]))
    assert predict.main(["digit.png", "three.idx"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"digit.png: {labels[0]} (p=")
    assert [line.split(": ")[1].split()[0] for line in lines[1:]] == [str(label) for label in labels[:3]]
    probability = float(lines[0].split("p=")[1].rstrip(")"))
    assert 0.1 < probability <= 1.0


def test_predict_errors_are_clear(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(project / "digit.png")
    assert predict.main(["digit.png"]) == 1
    assert "no production model" in capsys.readouterr().err
    _serve(project)
    Image.fromarray(np.zeros((32, 20), np.uint8)).save(project / "big.png")
    (project / "notes.txt").write_text("not an image")
    for path, message in (("big.png", "the image is 20x32; the model needs 28x28"),
                          ("notes.txt", "not a readable image or IDX file"),
                          ("missing.png", "no such file")):
        assert predict.main([path]) == 1
        assert message in capsys.readouterr().err


def test_colour_images_are_converted_to_grayscale(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _serve(project)
    digit = synthetic_arrays()["t10k-images-idx3-ubyte"][1]
    Image.fromarray(np.stack([digit] * 3, axis=-1)).save(project / "rgb.png")
    assert np.array_equal(predict.read_images(project / "rgb.png")[0], digit)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels in a few dozen bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    pixels = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def _idx(header: list[int], payload: int) -> bytes:
    return np.array(header, dtype=">i4").tobytes() + bytes(payload)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_idx([mnist.IMAGE_MAGIC, -1, -28, 28], 784), "dimensions cannot be negative"),
        (_idx([mnist.IMAGE_MAGIC, 3, 20, 20], 3 * 400), "holds images of 20x20; the model needs 28x28"),
        (_idx([mnist.IMAGE_MAGIC, 5, 28, 28], 10), "header says (5, 28, 28) (3936 bytes) but the file has 26 bytes"),
        (_png_header_only(100_000, 100_000), "the image claims too many pixels to decode"),
        (_png_header_only(10_000, 10_000), "the image is 10000x10000; the model needs 28x28"),
        (_png_header_only(28, 28)[:40], "not a readable image"),
    ],
    ids=["idx-negative-sizes", "idx-20x20", "idx-truncated", "png-bomb", "png-100-megapixels", "png-truncated"],
)
def test_hostile_inputs_are_refused_with_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "input"
    path.write_bytes(content)
    with pytest.raises(predict.InputError) as caught:
        predict.read_images(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("header", "message"),
    [([mnist.IMAGE_MAGIC, 2_000_000, 28, 28], "2000000 images; at most 100000 per file"),
     ([0, 0, 0, 0], "bytes is too large for a 28x28 image")],
    ids=["idx-of-1.5-GB", "unknown-file-of-1.5-GB"],
)
def test_huge_files_are_refused_from_their_header(tmp_path: Path, header: list[int], message: str) -> None:
    """A 1.5 GB file (sparse: it takes no disk) is refused after reading 16 bytes of it."""
    path = tmp_path / "huge"
    with open(path, "wb") as stream:
        stream.write(np.array(header, dtype=">i4").tobytes())
        stream.truncate(16 + 2_000_000 * 784)
    tracemalloc.start()
    try:
        with pytest.raises(predict.InputError, match=message):
            predict.read_images(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_errors_from_main_are_one_line_each(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _serve(project)
    (project / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (project / "negative.idx").write_bytes(_idx([mnist.IMAGE_MAGIC, -1, -28, 28], 784))
    for name in ("bomb.png", "negative.idx"):
        assert predict.main([name]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: {name}: ") and error.count("\n") == 1


# --- issue 24: images as people save them, or refused -------------------------------------------------


def _digit() -> np.ndarray:
    return synthetic_arrays()["t10k-images-idx3-ubyte"][1]


def _save_alpha_only(digit: np.ndarray, path: Path) -> None:
    """Black ink whose shape is only in the alpha channel (how drawing programs save a digit)."""
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = digit
    Image.fromarray(rgba, "RGBA").save(path)


def _save_16_bit(digit: np.ndarray, path: Path) -> None:
    Image.fromarray(digit.astype(np.uint16) * 257).save(path)


def _save_float_tiff(digit: np.ndarray, path: Path) -> None:
    Image.fromarray(digit.astype(np.float32) / 255.0, mode="F").save(path)


def _save_dark_on_light(digit: np.ndarray, path: Path) -> None:
    light = np.zeros((28, 28), np.uint8)
    light[4:24, 4:24] = digit[4:24, 4:24]
    Image.fromarray(255 - light).save(path)


@pytest.mark.parametrize(
    ("save", "name"),
    [(_save_alpha_only, "alpha.png"), (_save_16_bit, "sixteen.png"), (_save_float_tiff, "float.tiff"),
     (_save_dark_on_light, "paper.png")],
    ids=["alpha-only", "16-bit", "float-tiff", "dark-on-light"],
)
def test_images_are_read_as_people_save_them(tmp_path: Path, save, name: str) -> None:
    digit = _digit()
    if save is _save_dark_on_light:
        digit = np.zeros_like(digit)
        digit[4:24, 4:24] = _digit()[4:24, 4:24]
    save(digit, tmp_path / name)
    assert np.abs(predict.read_images(tmp_path / name)[0].astype(int) - digit).max() <= 1


@pytest.mark.parametrize(
    ("content", "message"),
    [(mnist.encode_idx(np.zeros((0, 28, 28), np.uint8)), "the IDX file holds no images"),
     (None, "the image is blank")],
    ids=["empty-idx", "blank-png"],
)
def test_inputs_without_a_digit_are_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "input"
    if content is None:
        Image.fromarray(np.full((28, 28), 7, np.uint8)).save(path.with_suffix(".png"))
        path = path.with_suffix(".png")
    else:
        path.write_bytes(content)
    with pytest.raises(predict.InputError, match=message):
        predict.read_images(path)


def test_a_fifo_or_a_directory_is_refused_without_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.png")
    for name, kind in (("fifo.png", "a FIFO"), (".", "a directory")):
        with pytest.raises(predict.InputError, match=f"is {kind}"):
            predict.read_images(tmp_path / name)
