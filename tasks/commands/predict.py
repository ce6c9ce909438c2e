"""Classify digits with the current production model (the highest ``models/production/<N>/``).

    python -m tasks.commands.predict digit.png [more.png ...] [t10k-images-idx3-ubyte ...]

Images must be 28x28 (grayscale, or colour converted to grayscale) with a light digit on a
dark background, as in MNIST; image files up to 1 MiB. An IDX image file (28x28 images, up to
100000 of them) classifies each of its images. Prints one line per image: the path (and
index), the predicted digit and its probability.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from tasks.lib import mnist
from tasks.lib.params import ParamsError, load_params


class InputError(ValueError):
    """An input file is unreadable or not a 28x28 digit."""


MAX_IMAGE_FILE_BYTES = 1 << 20  # a 28x28 PNG or JPEG takes a few KB
MAX_IDX_IMAGES = 100_000  # 78 MB of pixels; MNIST's biggest file holds 60000


def read_images(path: Path) -> np.ndarray:
    """uint8 images (n, 28, 28) from a PNG/JPEG (n = 1) or an IDX image file.

    Every size is checked before anything is decoded or read whole: the IDX header must
    declare 28x28 images that fill the file exactly, and an image file must be small and say
    28x28 in its header, so neither a lying header nor a decompression bomb costs memory."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as stream:
        magic = stream.read(4)
    if magic == mnist.IMAGE_MAGIC.to_bytes(4, "big"):
        return _read_idx_images(path)
    return _read_image_file(path)


def _read_idx_images(path: Path) -> np.ndarray:
    try:
        shape = mnist.read_idx_header(path)
    except mnist.DataError as error:
        raise InputError(str(error)) from None
    if shape[1:] != (mnist.IMAGE_SIDE, mnist.IMAGE_SIDE):
        raise InputError(f"{path}: holds images of {shape[2]}x{shape[1]}; the model needs 28x28")
    if shape[0] > MAX_IDX_IMAGES:
        raise InputError(f"{path}: {shape[0]} images; at most {MAX_IDX_IMAGES} per file")
    return mnist.read_idx(path)


def _read_image_file(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size > MAX_IMAGE_FILE_BYTES:
        raise InputError(f"{path}: {path.stat().st_size} bytes is too large for a 28x28 image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
        try:
            image = Image.open(path)  # reads the header only
        except Image.DecompressionBombError:
            raise InputError(f"{path}: the image claims too many pixels to decode; the model needs 28x28") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise InputError(f"{path}: not a readable image or IDX file ({error})") from None
    with image:
        if image.size != (mnist.IMAGE_SIDE, mnist.IMAGE_SIDE):
            raise InputError(f"{path}: the image is {image.size[0]}x{image.size[1]}; the model needs 28x28")
        try:
            pixels = np.asarray(image.convert("L"), dtype=np.uint8)
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: not a readable image ({error})") from None
    return pixels[None]


def current_model_dir(production: Path) -> Path:
    from tasks.lib.registry.production import versions

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
    from tasks.lib.model import ModelLoadError, load_serving_model

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
