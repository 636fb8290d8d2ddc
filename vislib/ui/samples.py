"""The sample pictures the pages offer (the bundled ones, or one generated picture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .. import render


def sample_choices() -> dict[str, Path | None]:
    """Sample name → file; when no sample ships yet, one generated picture (``None``)."""
    from ..models import sample_images

    files: dict[str, Path | None] = {p.stem: p for p in sample_images()}
    return files or {"generated shapes": None}


def generated_sample(size: int = 256) -> bytes:
    """A small synthetic picture (a few shapes on a soft background) as PNG bytes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([0.55 + 0.25 * xx, 0.6 + 0.2 * yy, 0.75 - 0.2 * xx], axis=-1)
    img = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    s = size
    draw.ellipse((0.12 * s, 0.18 * s, 0.45 * s, 0.51 * s), fill=(214, 60, 45))
    draw.rectangle((0.58 * s, 0.55 * s, 0.86 * s, 0.83 * s), fill=(40, 90, 170))
    draw.polygon([(0.62 * s, 0.12 * s), (0.88 * s, 0.42 * s), (0.52 * s, 0.42 * s)], fill=(245, 200, 40))
    return render.to_png_bytes(img)
