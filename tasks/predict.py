"""Classify digits with the current production model (the highest ``models/production/<N>/``).

    python -m tasks.predict digit.png [more.png ...] [t10k-images-idx3-ubyte ...]

Images must be 28x28 (grayscale, or colour converted to grayscale) with a light digit on a
dark background, as in MNIST. An IDX image file classifies each of its images. Prints one
line per image: the path (and index), the predicted digit and its probability.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tasks import mnist
from tasks.params import ParamsError, load_params


class InputError(ValueError):
    """An input file is unreadable or not a 28x28 digit."""


def read_images(path: Path) -> np.ndarray:
    """uint8 images (n, 28, 28) from a PNG/JPEG (n = 1) or an IDX image file."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.read_bytes()[:4] == mnist.IMAGE_MAGIC.to_bytes(4, "big"):
        try:
            return mnist.read_idx(path)
        except mnist.DataError as error:
            raise InputError(str(error)) from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{path}: not a readable image or IDX file ({error})") from None
    if pixels.shape != (28, 28):
        raise InputError(f"{path}: the image is {pixels.shape[1]}x{pixels.shape[0]}; the model needs 28x28")
    return pixels[None]


def current_model_dir(production: Path) -> Path:
    from tasks.production import versions

    published = versions(production)
    if not published:
        raise InputError(f"no production model in {production}/: run the pipeline (`dvc repro`) first")
    return production / str(published[-1])


def predict(loaded: object, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(digits, probabilities) for uint8 images (n, 28, 28), via the serving_default signature."""
    import tensorflow as tf

    answer = loaded.signatures["serving_default"](images=tf.constant(images))
    probabilities = answer["probabilities"].numpy()
    return probabilities.argmax(axis=1), probabilities.max(axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="PNG/JPEG digit images or IDX image files")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    from tasks.model import ModelLoadError, load_serving_model

    try:
        model_dir = current_model_dir(Path(load_params(args.params).paths.production))
        inputs = [(path, read_images(path)) for path in args.paths]  # all checked before any work
        loaded = load_serving_model(str(model_dir))
        for path, images in inputs:
            digits, probabilities = predict(loaded, images)
            for index, (digit, probability) in enumerate(zip(digits, probabilities)):
                label = f"{path}[{index}]" if len(images) > 1 else str(path)
                print(f"{label}: {digit} (p={probability:.3f})")
    except (InputError, ModelLoadError, ParamsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"(model: {model_dir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
