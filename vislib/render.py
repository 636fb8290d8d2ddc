"""Colormaps, overlays and PNG encoding (numpy + Pillow, no plotting library needed)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Anchor colours (position in [0, 1], RGB 0-255), linearly interpolated into 256-entry tables.
_ANCHORS: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    "jet": [(0.0, (0, 0, 128)), (0.125, (0, 0, 255)), (0.375, (0, 255, 255)),
            (0.625, (255, 255, 0)), (0.875, (255, 0, 0)), (1.0, (128, 0, 0))],
    "turbo": [(0.0, (48, 18, 59)), (0.125, (70, 107, 227)), (0.25, (40, 187, 236)),
              (0.375, (49, 242, 153)), (0.5, (162, 252, 60)), (0.625, (237, 208, 58)),
              (0.75, (251, 128, 34)), (0.875, (210, 49, 5)), (1.0, (122, 4, 3))],
    "viridis": [(0.0, (68, 1, 84)), (0.125, (71, 44, 122)), (0.25, (59, 82, 139)),
                (0.375, (44, 114, 142)), (0.5, (33, 145, 140)), (0.625, (39, 173, 129)),
                (0.75, (94, 201, 98)), (0.875, (170, 220, 50)), (1.0, (253, 231, 37))],
    "inferno": [(0.0, (0, 0, 4)), (0.125, (31, 12, 72)), (0.25, (85, 15, 109)),
                (0.375, (136, 34, 106)), (0.5, (186, 54, 85)), (0.625, (227, 89, 51)),
                (0.75, (249, 140, 10)), (0.875, (249, 201, 50)), (1.0, (252, 255, 164))],
    "gray": [(0.0, (0, 0, 0)), (1.0, (255, 255, 255))],
    "coolwarm": [(0.0, (59, 76, 192)), (0.5, (221, 221, 221)), (1.0, (180, 4, 38))],
}


def _table(anchors) -> np.ndarray:
    pos = np.array([p for p, _ in anchors])
    rgb = np.array([c for _, c in anchors], dtype=np.float64)
    t = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(t, pos, rgb[:, i]) for i in range(3)], axis=1).round().astype(np.uint8)


COLORMAPS: dict[str, np.ndarray] = {name: _table(a) for name, a in _ANCHORS.items()}


def apply_colormap(values: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Map an H×W array of values in [0, 1] to H×W×3 uint8 colours."""
    try:
        table = COLORMAPS[colormap]
    except KeyError:
        raise ValueError(f"unknown colormap {colormap!r}; available: {', '.join(COLORMAPS)}") from None
    idx = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return table[idx]


def heatmap(values: np.ndarray, colormap: str = "jet") -> Image.Image:
    return Image.fromarray(apply_colormap(values, colormap))


def overlay(
    image: Image.Image, values: np.ndarray, *, alpha: float = 0.5, colormap: str = "jet"
) -> Image.Image:
    """Blend a colormapped map over ``image``: (1 − alpha)·image + alpha·colour."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    values = np.asarray(values)
    if values.shape != (image.height, image.width):
        resized = Image.fromarray(values.astype(np.float32), mode="F").resize(image.size,
                                                                              Image.Resampling.BILINEAR)
        values = np.asarray(resized)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    colour = apply_colormap(values, colormap).astype(np.float32)
    return Image.fromarray(((1.0 - alpha) * base + alpha * colour).round().astype(np.uint8))


def to_png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Input-space signals (gradient, Deconvnet, guided backprop, SmoothGrad, IG): 3×H×W signed arrays


def _signal_array(signal) -> np.ndarray:
    if hasattr(signal, "detach"):
        signal = signal.detach().float().cpu().numpy()
    arr = np.nan_to_num(np.asarray(signal, dtype=np.float32))
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"an input-space signal is 3×H×W (channels first), not shape {arr.shape}")
    return arr


def _robust_max(values: np.ndarray, percentile: float) -> float:
    """The ``percentile`` of ``values`` (falling back to the maximum when that is 0)."""
    top = float(values.max()) if values.size else 0.0
    q = float(np.percentile(values, percentile)) if values.size else 0.0
    return q if q > 0 else top


def signed_rgb(signal, *, percentile: float = 99.5) -> Image.Image:
    """Signed RGB view of a 3×H×W signal: 0 is mid-gray, each channel's sign and size shown around it,
    one symmetric scale for all channels, clipped at the ``percentile`` of |signal|."""
    arr = _signal_array(signal)
    scale = _robust_max(np.abs(arr), percentile)
    unit = np.clip(arr / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(arr)
    rgb = (0.5 + 0.5 * unit).transpose(1, 2, 0)
    return Image.fromarray((rgb * 255.0).round().astype(np.uint8))


def magnitude_gray(signal, *, percentile: float = 99.5) -> Image.Image:
    """Grayscale magnitude view of a 3×H×W signal: max |·| over channels, clipped at its
    ``percentile`` and scaled to [0, 255] (black = no signal)."""
    mag = np.abs(_signal_array(signal)).max(axis=0)
    scale = _robust_max(mag, percentile)
    unit = np.clip(mag / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(mag)
    return Image.fromarray((unit * 255.0).round().astype(np.uint8), mode="L")
