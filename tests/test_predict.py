"""tasks/predict.py: the production model classifies digit images a user hands it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks import mnist, predict
from tasks.params import parse_params
from tasks.train import train_model

from .conftest import make_params_document, synthetic_arrays


@pytest.fixture
def project(tmp_path: Path, synthetic_source: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    document = make_params_document(synthetic_source)
    params = parse_params(document)
    train_model(params.model, params.train, 100, synthetic_source, tmp_path / "candidate", tmp_path / "reports",
                tmp_path / "checkpoints")
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
