"""Safe decoding of images from paths, bytes and PIL objects.

One decoding path for every upload and CLI input: an allow-list of formats, Pillow's
decompression-bomb warning treated as an error, a pixel ceiling, EXIF orientation applied, every mode
converted to RGB (transparency composited on a neutral grey).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"})
MAX_PIXELS = 40_000_000  # our own ceiling, below Pillow's bomb threshold
MAX_BYTES = 50 * 1024 * 1024
MIN_SIDE = 8
MAX_ASPECT = 20.0  # a 5000×8 strip would become a 140000×224 view after resizing its short side
NEUTRAL_BACKGROUND = (128, 128, 128)

ImageSource = "str | os.PathLike | bytes | Image.Image | np.ndarray"


def load_image(source, *, name: str | None = None) -> Image.Image:
    """Return ``source`` as a validated RGB PIL image, or raise :class:`InputError`.

    ``source`` is a path, raw file bytes, a PIL image, or an H×W×3 uint8 array. ``name`` is used in
    error messages (e.g. the uploaded file's name).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if not path.is_file():
            raise InputError(f"{label}: no such image file")
        if path.stat().st_size > MAX_BYTES:
            raise InputError(f"{label}: file is larger than {MAX_BYTES // 2**20} MB")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "image"
    else:
        raise InputError(f"cannot read an image from a {type(source).__name__}")
    return decode_image_bytes(data, name=label)


def decode_image_bytes(data: bytes, *, name: str = "image") -> Image.Image:
    """Decode file bytes into an RGB image, refusing anything unsafe or broken."""
    if not data:
        raise InputError(f"{name}: the file is empty")
    if len(data) > MAX_BYTES:
        raise InputError(f"{name}: file is larger than {MAX_BYTES // 2**20} MB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
            _check_geometry(img, name)
            img.seek(0)  # animated images: first frame
            img.load()
        except InputError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise InputError(f"{name}: image is too large (decompression bomb guard)") from None
        except UnidentifiedImageError:
            if _looks_like_allowed_format(data):
                raise InputError(f"{name}: the image file is broken or truncated") from None
            allowed = ", ".join(sorted(ALLOWED_FORMATS))
            raise InputError(f"{name}: not a supported image (allowed: {allowed})") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{name}: the image file is broken or truncated ({exc})") from None
    return _to_rgb(img, name=name, owned=True)


_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_allowed_format(data: bytes) -> bool:
    """True when the bytes start like a format we accept (so a decoding failure means damage)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data.startswith(_SIGNATURES)


def _check_geometry(img: Image.Image, name: str) -> None:
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{name}: {width}×{height} pixels is more than the limit of {MAX_PIXELS // 1_000_000} megapixels"
        )
    if min(width, height) < MIN_SIDE:
        raise InputError(f"{name}: {width}×{height} is too small (at least {MIN_SIDE} px a side)")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise InputError(f"{name}: {width}×{height} is too elongated (aspect ratio above {MAX_ASPECT:g}:1)")


def _to_rgb(img: Image.Image, *, name: str = "image", owned: bool = False) -> Image.Image:
    """RGB version of ``img``; ``owned``: ``img`` was decoded here, so it may be changed in place."""
    _check_geometry(img, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if owned:
                ImageOps.exif_transpose(img, in_place=True)
            else:
                img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not stop a good image
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = (hi - lo) or 1.0
        img = Image.fromarray(((arr - lo) / scale * 255).round().astype(np.uint8), "L")
    try:
        if img.mode == "P":
            img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            img.mode in ("L", "RGB") and "transparency" in img.info
        ):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, NEUTRAL_BACKGROUND + (255,))
            img = Image.alpha_composite(background, rgba)
        return img if img.mode == "RGB" and owned else img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"{name}: cannot convert an image of mode {img.mode} to RGB ({exc})") from None


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"an image array must be H×W×3 (got shape {arr.shape})")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).round().astype(np.uint8)
    return _to_rgb(Image.fromarray(arr), owned=True)
