"""Opening one image file as the model sees images: upright, 8-bit, in RGB (or L for 1-channel models).

Photos carry their camera orientation as an EXIF tag instead of rotated pixels; PIL ignores it, so a
portrait photo would reach the model on its side: it is applied here. PIL's own mode conversion is
right for RGBA, palette, CMYK and greyscale files, but clips 16- and 32-bit greyscale to 255 instead
of scaling it (a 16-bit PNG becomes almost white), so those are scaled to 8 bits first. Transparent
pixels keep their colour, as in torchvision's and timm's loaders (the alpha channel is dropped).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: what can go wrong opening a file that is not a readable image (truncated, empty, garbage, too large)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_image(path: str | Path, mode: str) -> Image.Image:
    """The image in `path`, decoded, upright, in `mode` ("RGB" or "L"); raises one of DECODE_ERRORS."""
    with Image.open(path) as image:
        return upright(image, mode)


def upright(image: Image.Image, mode: str) -> Image.Image:
    """An opened image decoded, turned upright by its EXIF orientation, in `mode`; raises one of DECODE_ERRORS."""
    image.load()  # decode now: a truncated file fails here, inside the caller's error handling
    return convert(ImageOps.exif_transpose(image), mode)


def convert(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode`, scaling wide greyscale to 8 bits rather than clipping it."""
    if image.mode in _WIDE_GREY:
        image = Image.fromarray(_to_8_bit(np.asarray(image)), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return image if image.mode == mode else image.convert(mode)


def _to_8_bit(values: np.ndarray) -> np.ndarray:
    """16-bit values (0..65535) to 8-bit (0..255); 32-bit integer images are read as 16-bit, the range
    PNG and TIFF greyscale files hold in them."""
    return (np.clip(values.astype(np.int64), 0, 65535) // 257).astype(np.uint8)
