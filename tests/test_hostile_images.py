"""A corpus of awkward and hostile inputs, generated here: each is decoded correctly or refused clearly.

Every case runs under a time bound, and the whole corpus under a memory bound; decoded images are
checked pixel-wise where the right answer is known.
"""

import io
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import vislib
from vislib.imageio import MAX_BYTES, NEUTRAL_BACKGROUND

GREY = NEUTRAL_BACKGROUND[0]


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: decoding it must be refused before any allocation."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def solid(mode, size=(24, 16), color=None):
    return Image.new(mode, size, color)


def animated_gif() -> bytes:
    frames = [solid("RGB", color=(255, 0, 0)), solid("RGB", color=(0, 0, 255))]
    return enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def animated_webp() -> bytes:
    frames = [solid("RGB", color=(0, 255, 0)), solid("RGB", color=(255, 0, 255))]
    return enc(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


def palette_with_transparency() -> bytes:
    img = solid("P", color=0)
    img.putpalette([10, 20, 30] * 256)
    return enc(img, "PNG", transparency=0)


def exif_jpeg(orientation: int) -> bytes:
    img = solid("RGB", size=(40, 20), color=(0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # white top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    return enc(img, "JPEG", exif=exif, quality=95)


def malformed_exif_jpeg() -> bytes:
    return enc(solid("RGB", color=(0, 200, 0)), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff garbage")


def sixteen_bit() -> bytes:
    return enc(Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)), "PNG")


def float_tiff() -> bytes:
    return enc(Image.fromarray(np.linspace(-5, 5, 32 * 32, dtype=np.float32).reshape(32, 32)), "TIFF")


def bad_crc_png() -> bytes:
    data = bytearray(enc(solid("RGB", color=(1, 2, 3)), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


def truncated(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    data = enc(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    return data[: len(data) // 2]


def pixel(img, x=0, y=0):
    return tuple(int(v) for v in np.asarray(img)[y, x])


def near(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# (id, bytes factory, check on the decoded image or the expected refusal fragment)
OK = [
    ("png-rgb", lambda: enc(solid("RGB", color=(9, 99, 199)), "PNG"), lambda im: pixel(im) == (9, 99, 199)),
    ("jpeg", lambda: enc(solid("RGB", color=(200, 100, 50)), "JPEG", quality=95),
     lambda im: near(pixel(im), (200, 100, 50))),
    ("webp-lossless", lambda: enc(solid("RGB", color=(1, 2, 3)), "WEBP", lossless=True),
     lambda im: pixel(im) == (1, 2, 3)),
    ("bmp", lambda: enc(solid("RGB", color=(7, 8, 9)), "BMP"), lambda im: pixel(im) == (7, 8, 9)),
    ("gif", lambda: enc(solid("RGB", color=(255, 0, 0)), "GIF"), lambda im: pixel(im) == (255, 0, 0)),
    ("gif-animated-first-frame", animated_gif, lambda im: pixel(im) == (255, 0, 0)),
    ("webp-animated-first-frame", animated_webp, lambda im: pixel(im) == (0, 255, 0)),
    ("png-palette-transparency", palette_with_transparency, lambda im: pixel(im) == NEUTRAL_BACKGROUND),
    ("png-la-transparent", lambda: enc(solid("LA", color=(255, 0)), "PNG"),
     lambda im: pixel(im) == NEUTRAL_BACKGROUND),
    ("png-rgba-half", lambda: enc(solid("RGBA", color=(255, 255, 255, 128)), "PNG"),
     lambda im: near(pixel(im), (192, 192, 192), 2)),
    ("webp-alpha", lambda: enc(solid("RGBA", color=(0, 0, 0, 0)), "WEBP", lossless=True),
     lambda im: pixel(im) == NEUTRAL_BACKGROUND),
    ("png-grayscale", lambda: enc(solid("L", color=77), "PNG"), lambda im: pixel(im) == (77, 77, 77)),
    ("png-1bit", lambda: enc(solid("1", color=1), "PNG"), lambda im: pixel(im) == (255, 255, 255)),
    ("png-16bit-rescaled", sixteen_bit,
     lambda im: np.asarray(im).min() == 0 and np.asarray(im).max() == 255 and len(np.unique(np.asarray(im))) > 200),
    ("tiff-cmyk", lambda: enc(solid("CMYK", color=(255, 0, 0, 0)), "TIFF"),
     lambda im: pixel(im) == (0, 255, 255)),
    ("tiff-float", float_tiff, lambda im: pixel(im) == (0, 0, 0) and pixel(im, 31, 31) == (255, 255, 255)),
    ("jpeg-exif-rotate-90", lambda: exif_jpeg(6), lambda im: im.size == (20, 40) and pixel(im, 15, 5)[0] > 200),
    ("jpeg-exif-rotate-180", lambda: exif_jpeg(3),
     lambda im: im.size == (40, 20) and pixel(im, 35, 15)[0] > 200 and pixel(im, 2, 2)[0] < 50),
    ("jpeg-malformed-exif", malformed_exif_jpeg, lambda im: near(pixel(im), (0, 200, 0), 8)),
    ("minimal-8x8", lambda: enc(solid("RGB", size=(8, 8), color=(5, 5, 5)), "PNG"), lambda im: im.size == (8, 8)),
]

REFUSED = [
    ("empty", lambda: b"", "empty"),
    ("random-bytes", lambda: np.random.default_rng(1).bytes(4096), "not a supported image"),
    ("eps", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not a supported image"),
    ("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not a supported image"),
    ("pdf", lambda: b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n%%EOF", "not a supported image"),
    ("tga-not-allowed", lambda: enc(solid("RGB"), "TGA"), "not a supported image"),
    ("ico-not-allowed", lambda: enc(solid("RGB", size=(32, 32)), "ICO"), "not a supported image"),
    ("truncated-png", lambda: truncated("PNG"), "broken or truncated"),
    ("truncated-jpeg", lambda: truncated("JPEG"), "broken or truncated"),
    ("bad-crc-png", bad_crc_png, "broken or truncated"),
    ("bomb-header-40000x40000", lambda: png_header_only(40000, 40000), "too large"),
    ("over-pixel-ceiling-8000x6000", lambda: png_header_only(8000, 6000), "megapixels"),
    ("tiny-4x4", lambda: enc(solid("RGB", size=(4, 4)), "PNG"), "too small"),
    ("elongated-2000x20", lambda: enc(solid("RGB", size=(2000, 20)), "PNG"), "elongated"),
    ("over-size-limit", lambda: b"\x89PNG" + b"\x00" * (MAX_BYTES + 1), "larger than"),
]


def test_corpus_is_large_enough():
    assert len(OK) + len(REFUSED) >= 30


@pytest.mark.parametrize("case, make, check", OK, ids=[c[0] for c in OK])
def test_decoded_correctly(case, make, check):
    data = make()
    start = time.perf_counter()
    image = vislib.load_image(data, name=case)
    assert time.perf_counter() - start < 2.0
    assert image.mode == "RGB"
    assert check(image), f"{case}: wrong pixels {pixel(image)}"


@pytest.mark.parametrize("case, make, fragment", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_clear_message(case, make, fragment):
    data = make()
    start = time.perf_counter()
    with pytest.raises(vislib.InputError) as info:
        vislib.load_image(data, name=case)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert message.startswith(case) and fragment in message, message


def test_paths_and_arrays(tmp_path):
    with pytest.raises(vislib.InputError, match="no such image file"):
        vislib.load_image(tmp_path / "missing.png")
    with pytest.raises(vislib.InputError, match="no such image file"):
        vislib.load_image(tmp_path)
    with pytest.raises(vislib.InputError, match="cannot read an image"):
        vislib.load_image(12345)
    arr = np.full((16, 16, 3), 0.5, dtype=np.float32)
    assert pixel(vislib.load_image(arr)) == (128, 128, 128)


def test_whole_corpus_memory_bound():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _, make, *_ in OK + REFUSED:
        try:
            vislib.load_image(make())
        except vislib.InputError:
            pass
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, f"peak RSS grew by {grown_mb:.0f} MB"
