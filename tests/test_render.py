"""Colormaps and overlays: checked against the blending formula, not against stored pictures."""

import io

import numpy as np
import pytest
from PIL import Image

from vislib.render import COLORMAPS, apply_colormap, overlay, to_png_bytes


@pytest.mark.parametrize("name", sorted(COLORMAPS))
def test_colormap_tables_are_256_rgb_entries(name):
    table = COLORMAPS[name]
    assert table.shape == (256, 3) and table.dtype == np.uint8


def test_colormap_endpoints_and_clipping():
    values = np.array([[0.0, 1.0, -3.0, 7.0, np.nan]])
    out = apply_colormap(values, "gray")
    assert out[0, :, 0].tolist() == [0, 255, 0, 255, 0]
    assert tuple(apply_colormap(np.array([[1.0]]), "jet")[0, 0]) == (128, 0, 0)


def test_overlay_follows_the_blending_formula():
    base = Image.new("RGB", (4, 2), (100, 50, 200))
    values = np.full((2, 4), 1.0, dtype=np.float32)
    assert np.array_equal(np.asarray(overlay(base, values, alpha=0.0)), np.asarray(base))
    full = np.asarray(overlay(base, values, alpha=1.0, colormap="gray"))
    assert (full == 255).all()
    half = np.asarray(overlay(base, values, alpha=0.5, colormap="gray")).astype(int)
    expected = np.round(0.5 * np.array([100, 50, 200]) + 0.5 * 255)
    assert (np.abs(half[0, 0] - expected) <= 1).all()


def test_overlay_resizes_a_map_of_another_size_and_checks_alpha():
    base = Image.new("RGB", (32, 16))
    assert overlay(base, np.zeros((4, 8)), alpha=0.3).size == (32, 16)
    with pytest.raises(ValueError):
        overlay(base, np.zeros((16, 32)), alpha=1.5)
    with pytest.raises(ValueError, match="unknown colormap"):
        apply_colormap(np.zeros((2, 2)), "rainbowish")


def test_png_bytes_round_trip():
    img = Image.new("RGB", (5, 3), (1, 2, 3))
    assert Image.open(io.BytesIO(to_png_bytes(img))).getpixel((0, 0)) == (1, 2, 3)
