"""Init and mask images: decoding, and resizing as diffusers' VaeImageProcessor resizes."""
import io

import numpy as np
import pytest
from PIL import Image

from sdcore.errors import ImageError
from sdcore.images import RESIZE_POLICIES, fit_image, fit_mask, read_image


def picture(mode: str, size=(50, 30)) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("resize, resize_mode", [("stretch", "default"), ("crop", "crop")])
@pytest.mark.parametrize("size", [(50, 30), (20, 70)])
def test_fit_image_and_mask_resize_like_diffusers(resize, resize_mode, size):
    from diffusers.image_processor import VaeImageProcessor

    assert resize in RESIZE_POLICIES
    image, mask = picture("RGB", size), picture("L", size)
    processor = VaeImageProcessor()
    expected_image = np.asarray(processor.resize(image, 40, 48, resize_mode=resize_mode).convert("RGB"))
    expected_mask = np.asarray(processor.resize(mask, 40, 48, resize_mode=resize_mode).convert("L"))
    got_image, got_mask = fit_image(image, width=48, height=40, resize=resize), fit_mask(mask, 48, 40, resize)
    assert got_image.shape == (40, 48, 3) and got_image.dtype == np.uint8 and got_mask.shape == (40, 48)
    assert np.array_equal(got_image, expected_image) and np.array_equal(got_mask, expected_mask)


def test_read_image_decodes_any_format_and_names_the_problem():
    buf = io.BytesIO()
    picture("RGB").save(buf, format="PNG")
    png = buf.getvalue()
    assert read_image(png).size == (50, 30)
    assert fit_image(picture("P"), 16, 8).shape == (8, 16, 3) and fit_mask(picture("RGBA"), 16, 8).shape == (8, 16)
    with pytest.raises(ImageError, match=r"not an image format Pillow reads \(12 bytes, beginning b'not an i'\)"):
        read_image(b"not an image")
    with pytest.raises(ImageError, match=rf"cannot decode image \({len(png) // 2} bytes\): "):
        read_image(png[: len(png) // 2])
    assert issubclass(ImageError, ValueError)
    with pytest.raises(ValueError, match="resize must be one of"):
        fit_image(picture("RGB"), 16, 16, resize="fill")
