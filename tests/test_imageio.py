"""Image loading: formats, modes, orientation and refusals (the basics; hostile inputs have their own)."""

import io

import numpy as np
import pytest
from PIL import Image

import vislib


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_common_formats_decode_to_rgb(fmt):
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    out = vislib.load_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert abs(int(np.asarray(out)[15, 20, 0]) - 200) < 8


def test_rgba_is_composited_on_neutral_grey():
    img = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    out = np.asarray(vislib.load_image(encode(img, "PNG")))
    assert (out == 128).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    out = vislib.load_image(encode(img, "JPEG", exif=exif))
    assert out.size == (20, 40)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    arr = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    out = np.asarray(vislib.load_image(encode(Image.fromarray(arr), "PNG")))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 100


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty"),
        (b"not an image at all", "not a supported image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a supported image"),
    ],
)
def test_refusals_are_input_errors(data, fragment):
    with pytest.raises(vislib.InputError, match=fragment):
        vislib.load_image(data)


def test_truncated_and_tiny_images_are_refused():
    good = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(vislib.InputError, match="broken or truncated"):
        vislib.load_image(good[: len(good) // 2])
    with pytest.raises(vislib.InputError, match="too small"):
        vislib.load_image(encode(Image.new("RGB", (3, 3)), "PNG"))
