"""Classify digits with the current production model (the highest ``models/production/<N>/``).

    python -m tasks.commands.predict digit.png [more.png ...] [t10k-images-idx3-ubyte ...]

Images must be 28x28: 8-bit grey or colour (converted to grey), 16-bit grey, float grey in
[0, 1] (TIFF), or with transparency (a one-colour digit on a transparent background is read from
its alpha channel, anything else composited on black); a dark digit on a light background is
inverted to MNIST's light on dark, with a note; a blank image is refused. Image files up to
1 MiB. An IDX image file (28x28 images, up to
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
from tasks.lib.files import FileProblem, check_regular_file, open_regular_file
from tasks.lib.params import ParamsError, load_params
from tasks.lib.registry.production import RegistryError, versions


class InputError(ValueError):
    """An input file is unreadable or not a 28x28 digit."""


MAX_IMAGE_FILE_BYTES = 1 << 20  # a 28x28 PNG or JPEG takes a few KB
MAX_IDX_IMAGES = 100_000  # 78 MB of pixels; MNIST's biggest file holds 60000
ANY_SIZE = 1 << 62  # for checks of a file's kind; its size is judged from its header


def read_images(path: Path) -> np.ndarray:
    """uint8 images (n, 28, 28) from a PNG/JPEG/TIFF (n = 1) or an IDX image file.

    Every size is checked before anything is decoded or read whole: the path must be a regular
    file (never a FIFO or a device), the IDX header must declare 28x28 images that fill the file
    exactly, and an image file must be small and say 28x28 in its header, so neither a lying
    header nor a decompression bomb costs memory."""
    try:
        with open_regular_file(path, ANY_SIZE) as stream:  # 4 bytes are read; sizes are checked below
            magic = stream.read(4)
    except FileProblem as error:
        raise InputError(str(error)) from None
    if magic == mnist.IMAGE_MAGIC.to_bytes(4, "big"):
        return _read_idx_images(path)
    return _read_image_file(path)


def _read_idx_images(path: Path) -> np.ndarray:
    try:
        shape = mnist.read_idx_header(path)
    except mnist.DataError as error:
        raise InputError(str(error)) from None
    if len(shape) != 3:
        raise InputError(f"{path}: holds an array of shape {shape}, not images; the model needs 28x28 images")
    if shape[1:] != (mnist.IMAGE_SIDE, mnist.IMAGE_SIDE):
        raise InputError(f"{path}: holds images of {shape[2]}x{shape[1]}; the model needs 28x28")
    if shape[0] == 0:
        raise InputError(f"{path}: the IDX file holds no images")
    if shape[0] > MAX_IDX_IMAGES:
        raise InputError(f"{path}: {shape[0]} images; at most {MAX_IDX_IMAGES} per file")
    try:
        return mnist.read_idx(path)
    except mnist.DataError as error:
        raise InputError(str(error)) from None


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    size = check_regular_file(path, ANY_SIZE)
    if size > MAX_IMAGE_FILE_BYTES:
        raise InputError(f"{path}: {size} bytes is too large for a 28x28 image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
        try:
            return Image.open(path)  # reads the header only
        except Image.DecompressionBombError:
            raise InputError(f"{path}: the image claims too many pixels to decode; the model needs 28x28") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise InputError(f"{path}: not a readable image or IDX file ({error})") from None


def _read_image_file(path: Path) -> np.ndarray:
    image = _open_image(path)
    with image:
        if image.size != (mnist.IMAGE_SIDE, mnist.IMAGE_SIDE):
            raise InputError(f"{path}: the image is {image.size[0]}x{image.size[1]}; the model needs 28x28")
        if getattr(image, "n_frames", 1) > 1:
            raise InputError(f"{path}: holds {image.n_frames} frames; give one digit per image file")
        try:
            image.load()
            pixels = _intensity(image, path)
        except (OSError, ValueError, SyntaxError) as error:
            raise InputError(f"{path}: not a readable image ({error})") from None
    return _as_mnist(pixels, path)[None]


def _intensity(image, path: Path) -> np.ndarray:
    """Grey levels in [0, 1] (float64, 28x28) of the image as people save digits: 8-bit grey or
    colour, 16-bit grey, float grey in [0, 1] or [0, 255], and transparency. With an alpha
    channel, a digit drawn in one colour on a transparent background is its alpha channel;
    otherwise the image is composited on black."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image, dtype=np.float64) / 65535.0
    if mode in ("I", "F"):
        return _scaled_numbers(np.asarray(image, dtype=np.float64), mode, path)
    if "A" in mode or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0
        colour, alpha = rgba[..., :3], rgba[..., 3]
        if alpha.min() == alpha.max():  # alpha says nothing: an opaque (or fully clear) image
            return np.asarray(image.convert("L"), dtype=np.float64) / 255.0 if alpha.max() > 0 else alpha
        drawn = alpha > 0
        if np.ptp(colour[drawn], axis=0).max() <= 1 / 255:  # one ink colour: the shape is in alpha
            return alpha
        grey = np.asarray(image.convert("RGBA").convert("L"), dtype=np.float64) / 255.0
        return grey * alpha  # composited on black
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _scaled_numbers(values: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Float (mode F) or 32-bit integer (mode I) grey levels to [0, 1]: floats in [0, 1] are
    taken as they are, anything up to 255 as 8-bit levels, up to 65535 as 16-bit (how 16-bit
    PNGs open in some Pillow versions); other values are refused."""
    if not np.isfinite(values).all():
        raise InputError(f"{path}: holds NaN or infinite pixel values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 65535:
        raise InputError(f"{path}: pixel values from {low:g} to {high:g}; expected [0, 1], 0..255 or 0..65535")
    if mode == "F" and high <= 1.0:
        return values
    return values / 255.0 if high <= 255 else values / 65535.0


def _as_mnist(intensity: np.ndarray, path: Path) -> np.ndarray:
    """uint8 pixels as MNIST has them (a light digit on black). A blank image is refused (there is
    no digit to read); a dark digit on a light background (the edge brighter than the middle) is
    inverted, and the note says so."""
    if float(intensity.max() - intensity.min()) < 16 / 255:
        raise InputError(f"{path}: the image is blank (every pixel about {intensity.mean():.2f}); no digit to read")
    edge = np.concatenate([intensity[0], intensity[-1], intensity[:, 0], intensity[:, -1]])
    if edge.mean() > 0.7:  # MNIST's edges are black; a scan of ink on paper is near white
        print(f"note: {path}: a dark digit on a light background; inverted to MNIST's light on dark", file=sys.stderr)
        intensity = 1.0 - intensity
    return np.clip(np.rint(intensity * 255.0), 0, 255).astype(np.uint8)


def current_model_dir(production: Path) -> Path:
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
    try:  # every input checked before TensorFlow loads (seconds): a refusal is immediate
        model_dir = current_model_dir(Path(load_params(args.params).paths.production))
        inputs = [(path, read_images(path)) for path in args.paths]
    except (InputError, ParamsError, RegistryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from tasks.lib.model import ModelLoadError, load_serving_model

    try:
        loaded = load_serving_model(str(model_dir))
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path, images in inputs:
        digits, probabilities = predict(loaded, images)
        for index, (digit, probability) in enumerate(zip(digits, probabilities)):
            label = f"{path}[{index}]" if len(images) > 1 else str(path)
            print(f"{label}: {digit} (p={probability:.3f})")
    print(f"(model: {model_dir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
