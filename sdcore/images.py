"""Init and mask images for image to image and inpainting: bytes → PIL image → uint8 array at a row's size.

Resized with Lanczos as diffusers' VaeImageProcessor resizes them, so a row given a picture of another
size gets the pixels the reference pipeline would work on. "stretch" is its resize_mode "default"
(the whole picture, distorted to the size), "crop" its "crop" (scaled to cover the size, centred,
the overhang cut off).
"""
import io

import numpy as np
from PIL import Image

from sdcore.errors import ImageError

RESIZE_POLICIES = ("stretch", "crop")


def read_image(data: bytes) -> Image.Image:
    """The decoded image; ImageError with the reason if the bytes are not an image PIL can read."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not later in a resize
    except Image.UnidentifiedImageError:  # its message names only an in-memory file object
        raise ImageError(f"not an image format Pillow reads ({len(data)} bytes, beginning {data[:8]!r})") from None
    except Exception as e:
        raise ImageError(f"cannot decode image ({len(data)} bytes): {e}") from None
    return image


def fit_image(image: Image.Image, width: int, height: int, resize: str = "stretch") -> np.ndarray:
    """image as uint8 [height, width, 3] RGB."""
    return np.asarray(_resized(image, width, height, resize).convert("RGB"))


def fit_mask(image: Image.Image, width: int, height: int, resize: str = "stretch") -> np.ndarray:
    """image as uint8 [height, width] grayscale (white = repaint)."""
    return np.asarray(_resized(image, width, height, resize).convert("L"))


def _resized(image: Image.Image, width: int, height: int, resize: str) -> Image.Image:
    """Resized, then converted by the caller, in the reference's order."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # palette and 1-bit images would be resized with nearest neighbours
    if resize == "stretch":
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    # Scaled so that it covers width x height, keeping its aspect ratio, then centred on that canvas.
    fit_width = width if width / height > image.width / image.height else image.width * height // image.height
    fit_height = height if width / height <= image.width / image.height else image.height * width // image.width
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.resize((fit_width, fit_height), resample=Image.Resampling.LANCZOS),
                 box=(width // 2 - fit_width // 2, height // 2 - fit_height // 2))
    return canvas
