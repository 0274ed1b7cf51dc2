"""Image files to the uint8 arrays a run was trained on, with Pillow.

Every file is converted to the run's recorded :class:`~jaxes.data.InputSpec` in this order:

1. Decode, apply the EXIF orientation (camera JPEGs), take the first frame (GIF, TIFF).
2. Mode to the spec's channels: 1 channel is Pillow's ``L``, 3 channels is ``RGB``.

   - RGB to L is Pillow's ITU-R 601-2 luma ``L = (299 R + 587 G + 114 B) / 1000``; L to RGB
     repeats the gray value in all three channels.
   - Transparency (RGBA, LA, PA, P with a transparent colour) is composited on **black**:
     the data sets jaxes trains on (digits, MNIST) draw light strokes on a black background,
     so a transparent background means black. Compositing before resizing is also what makes
     the resize weigh colours by their coverage.
   - 16-bit gray (``I;16``, ``I``) is scaled from 0..65535 to 0..255 (Pillow's own conversion
     would clip everything above 255 to white); bilevel ``1`` becomes 0/255.
   - Modes without a fixed mapping to gray or RGB values are refused: CMYK (needs an ICC
     profile), LAB, HSV, and 32-bit float ``F`` (no defined range).
3. Size to (width, height) of the spec, stretching (no crop): ``BOX`` (area average) when
   shrinking in both directions, else ``BICUBIC``. An image already of that size is not
   resampled, so a PNG of a data set image reads back bit-exact.

The result is uint8 (H, W, C); scaling to float is the spec's ``normalize``, done inside the model
function (``infer.Evaluator`` and the exported function both take uint8).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # only Pillow and numpy at run time, so serving code may use this module too
    from jaxes import data as data_lib

# What a directory given to --images contributes; a glob or a file path is taken as it is.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
SUPPORTED_CHANNELS = {1: "L", 3: "RGB"}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_REFUSED_MODES = {
    "CMYK": "CMYK needs a colour profile to map to RGB",
    "LAB": "LAB has no fixed mapping to 8-bit RGB here",
    "HSV": "HSV has no fixed mapping to 8-bit RGB here",
    "F": "32-bit float pixels have no defined range",
}


class ImageError(ValueError):
    """A file cannot be read as an image (missing, corrupt, or not an image)."""


class ChannelError(ValueError):
    """An image's mode, or the spec's channel count, has no mapping to the other."""


def check_spec(spec: data_lib.InputSpec) -> None:
    """Raises ChannelError unless image files can be converted to ``spec`` at all."""
    if spec.channels not in SUPPORTED_CHANNELS:
        raise ChannelError(
            f"the run's input spec has {spec.channels} channels, and image files convert only "
            "to 1 (grayscale) or 3 (RGB) channels; embed its data set with --split instead."
        )


def expand(pattern: str) -> list[Path]:
    """The files that ``--images`` names, in sorted order.

    Args:
      pattern: a file, a directory (its files with an image suffix, not recursive), or a glob
        (``**`` recurses); a glob's matches are taken whatever their suffix.

    Returns:
      Sorted, de-duplicated file paths; empty when nothing matches.
    """
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
    if path.is_file():
        return [path]
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    return sorted({Path(m) for m in matches if os.path.isfile(m)})


def _sixteen_bit_to_gray(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.int64)
    scaled = (np.clip(values, 0, 65535) * 255 + 32767) // 65535  # round half up
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _to_mode(image: Image.Image, target: str, name: str) -> Image.Image:
    """Converts a decoded image to ``target`` ("L" or "RGB") by the rules of the module doc."""
    mode = image.mode
    if mode in _REFUSED_MODES:
        raise ChannelError(
            f"{name} has mode {mode} ({_REFUSED_MODES[mode]}), which does not map to the run's "
            f"{len(target)}-channel {target} input; save it as RGB or grayscale first."
        )
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    if mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_gray(image)
    elif mode in _ALPHA_MODES:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image.convert("RGBA"))
    if image.mode not in ("1", "L", "RGB", "RGBA", "RGBX", "YCbCr"):
        raise ChannelError(
            f"{name} has mode {image.mode}, which does not map to the run's "
            f"{len(target)}-channel {target} input; save it as RGB or grayscale first."
        )
    return image if image.mode == target else image.convert(target)


def to_spec(image: Image.Image, spec: data_lib.InputSpec, name: str = "the image") -> np.ndarray:
    """Converts a decoded Pillow image to the spec's uint8 (H, W, C) array.

    Args:
      image: a decoded image of any size and mode.
      spec: the run's input spec (1 or 3 channels); anything with height, width, channels.
      name: how error messages call the image (its file name).

    Returns:
      uint8 array of shape ``spec.shape``.

    Raises:
      ChannelError: the image's mode, or the spec, has no mapping (see the module doc).
    """
    check_spec(spec)
    image = _to_mode(image, SUPPORTED_CHANNELS[spec.channels], name)
    size = (spec.width, spec.height)
    if image.size != size:
        shrinking = image.width >= spec.width and image.height >= spec.height
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
        image = image.resize(size, resample=resample)
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(spec.height, spec.width, spec.channels)  # L is (H, W): add an axis


def read(path: str | os.PathLike, spec: data_lib.InputSpec) -> np.ndarray:
    """Reads one image file as the spec's uint8 (H, W, C) array.

    Raises:
      ImageError: the file is missing, unreadable, corrupt or not an image.
      ChannelError: its mode does not map to the spec.
    """
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, inside the try
            image = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError as error:
        raise ImageError(f"{path} is not an image file Pillow can read ({error}).") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow reports truncated and corrupt data as OSError, some decoders as SyntaxError.
        raise ImageError(f"{path} could not be read as an image ({error}).") from error
    return to_spec(image, spec, str(path))


def read_all(
    paths: list[Path], spec: data_lib.InputSpec, *, skip_bad: bool
) -> tuple[np.ndarray, list[str], list[dict]]:
    """Reads files into one uint8 (N, H, W, C) batch, in order.

    Args:
      paths: the image files.
      spec: the run's input spec.
      skip_bad: go on past unreadable files and unmappable modes, recording why; else raise.

    Returns:
      ``(images, kept, skipped)``: the array, the file of each row, and ``{"file", "reason"}``
      for every skipped file.

    Raises:
      ImageError, ChannelError: a file failed and ``skip_bad`` is False.
    """
    check_spec(spec)
    images = np.empty((len(paths), spec.height, spec.width, spec.channels), np.uint8)
    kept, skipped = [], []
    for path in paths:
        try:
            images[len(kept)] = read(path, spec)
        except (ImageError, ChannelError) as error:
            if not skip_bad:
                raise
            skipped.append({"file": str(path), "reason": str(error)})
            continue
        kept.append(str(path))
    return images[: len(kept)], kept, skipped
