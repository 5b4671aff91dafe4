"""Images for models that read them (GLM-4V), decoded on the worker's side (in a helper process of its,
image_pool.py, never in its event loop) so that the engine never sees a file it could choke on:
Pillow opens it (formats below only), its pixel count is bounded before any pixel is decoded, and it
is flattened to RGB and resized to the vision tower's square input, which is what chatglm.cpp would
do itself. What goes to the engine is then raw pixels of a known size: the engine checks only their
length."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from backends.base import ImageInput, ImageTooLarge, InvalidImage

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(image: ImageInput, size: int, max_pixels: int, param: str) -> ImageInput:
    """The image as ``size`` x ``size`` RGB pixels; InvalidRequest (a 400) if it is not a readable
    image of a supported format, or has more than ``max_pixels`` pixels."""
    try:
        raw = base64.b64decode(image.data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the image's base64 data is corrupt", param) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageTooLarge(
                        f"The image is {width}x{height} pixels; this server takes at most {max_pixels} "
                        "(MAX_IMAGE_PIXELS). Send a smaller image.", param=param)
                im.load()
                rgb = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError):
        raise _bad(f"the data is not a readable image ({', '.join(FORMATS)})", param) from None
    return ImageInput(base64.b64encode(rgb.tobytes()).decode("ascii"), size, size)


def _bad(why: str, param: str) -> InvalidImage:
    return InvalidImage(f"Invalid image: {why}.", param=param)
