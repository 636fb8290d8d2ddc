"""Deterministic synthetic "shapes" dataset: one coloured shape on a cluttered, textured background.

Why synthetic: every image comes with the exact pixel mask of its object, so localisation
metrics (pointing game, energy inside the mask, ...) have a ground truth, and any single
image can be regenerated from its ``(split, index)`` without storing or generating the rest.

Each image (``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB) is drawn as:

1. a background: a two-colour linear gradient plus, most of the time, one texture
   (smooth blobs, stripes or plaid);
2. clutter: thin strokes, short zig-zags and dots that are not class shapes, some drawn
   under the object and some over it (those occlude it a little);
3. the object: one of ``CLASSES`` with random size, position, rotation, slight
   anisotropic stretch, colour and shading, anti-aliased from a signed distance function;
4. pixel noise, then quantisation to uint8.

A fixed share of samples (``HARD_FRACTION``) is a *hard case*, recorded in ``Sample.hard``:
``"small"`` (a tiny object), ``"low_contrast"`` (object colour close to the background)
or ``"occluded"`` (a thick stroke covers a large part of the object), so that a trained
model makes some real mistakes.

Determinism: sample ``index`` of ``split`` uses ``np.random.default_rng([SPLIT_SEEDS[split], index])``
(a ``SeedSequence`` over the pair, so streams never collide across splits or indices);
labels come from a seeded permutation of the classes per block of 8 indices, so every
aligned block of ``NUM_CLASSES`` consecutive indices holds each class exactly once.

Public API: :func:`make_sample`, :func:`make_multi_instance`, :func:`apply_mark`,
:func:`materialise`, :class:`ShapesDataset` and the constants below.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CLASSES",
    "HARD_FRACTION",
    "HARD_REASONS",
    "IMAGE_SIZE",
    "MARK_BOX",
    "MULTI_SEED",
    "NUM_CLASSES",
    "SPLIT_SEEDS",
    "SPLIT_SIZES",
    "MultiSample",
    "Sample",
    "ShapesDataset",
    "apply_mark",
    "label_of",
    "make_multi_instance",
    "make_sample",
    "mark_pattern",
    "materialise",
]

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "crescent", "hexagon",
)
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 128

SPLIT_SEEDS: dict[str, int] = {"train": 20_241, "val": 20_242, "test": 20_243}
SPLIT_SIZES: dict[str, int] = {"train": 24_000, "val": 2_000, "test": 2_000}
MULTI_SEED = 20_249
"""Base seed of :func:`make_multi_instance` images (a split of their own)."""

HARD_FRACTION = 0.15
"""Share of samples drawn as hard cases; the reasons are equally likely."""
HARD_REASONS: tuple[str, ...] = ("small", "low_contrast", "occluded")

MARK_BOX: tuple[int, int, int, int] = (4, 4, 10, 10)
"""``(x0, y0, x1, y1)`` of the 6x6 shortcut mark stamped by :func:`apply_mark`."""

_LABEL_SEED = 7_919  # extra seed word for the per-block label permutations
_RADIUS = (14.0, 34.0)  # circumradius range (px) of normal objects
_SMALL_RADIUS = (8.0, 11.0)  # ... of "small" hard cases
_MULTI_RADIUS = (10.0, 20.0)  # ... of multi-instance objects
_MIN_CONTRAST = 0.35  # RGB distance between object and local background, normal case
_LOW_CONTRAST = (0.10, 0.18)  # ... for "low_contrast" hard cases
_MIN_VISIBLE = 0.85  # share of the object that ordinary clutter may leave visible
_OCCLUDED_VISIBLE = (0.5, 0.8)  # visible share targeted by "occluded" hard cases

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Sample:
    """One generated image and its ground truth.

    Attributes:
        image: the RGB image, ``IMAGE_SIZE`` x ``IMAGE_SIZE``.
        label: index into ``CLASSES``.
        mask: bool H x W, the object's visible pixels (occluding clutter and mark removed).
        box: ``(x0, y0, x1, y1)`` of the whole object (occluded parts included), end-exclusive,
            so ``mask[y0:y1, x0:x1]`` holds every mask pixel.
        hard: ``None`` or the hard-case reason, one of ``HARD_REASONS``.
        split: the split the sample belongs to.
        index: its index in the split.
        marked: whether the shortcut mark is stamped.
    """

    image: Image.Image
    label: int
    mask: np.ndarray
    box: Box
    hard: str | None
    split: str
    index: int
    marked: bool = False

    @property
    def class_name(self) -> str:
        """The label's name."""
        return CLASSES[self.label]


@dataclass(frozen=True)
class MultiSample:
    """An image with several instances of one class (see :func:`make_multi_instance`).

    Attributes:
        image: the RGB image.
        label: index into ``CLASSES``, shared by all instances.
        masks: one bool H x W mask per instance (instances never overlap).
        boxes: one ``(x0, y0, x1, y1)`` per instance, end-exclusive.
        index: the image's index.
    """

    image: Image.Image
    label: int
    masks: tuple[np.ndarray, ...]
    boxes: tuple[Box, ...]
    index: int

    @property
    def class_name(self) -> str:
        """The label's name."""
        return CLASSES[self.label]


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Window:
    """A rectangular window of the image with its pixel-centre coordinates."""

    rows: slice
    cols: slice
    x: np.ndarray  # (h, w) x coordinate of pixel centres
    y: np.ndarray  # (h, w) y coordinate of pixel centres


def _window(cx: float, cy: float, half: float, size: int = IMAGE_SIZE) -> _Window:
    """The window covering the square of half-side ``half`` around ``(cx, cy)``, clipped."""
    x0, x1 = max(0, int(cx - half) - 1), min(size, int(math.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(cy - half) - 1), min(size, int(math.ceil(cy + half)) + 1)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return _Window(slice(y0, y1), slice(x0, x1), x, y)


@cache
def _regular_polygon(n: int, inner: float | None = None) -> np.ndarray:
    """Vertices (K, 2) of a regular n-gon of circumradius 1, or a star if ``inner`` is set."""
    if inner is None:
        t = np.pi / 2 + 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], 1).astype(np.float32)
    t = np.pi / 2 + np.pi * np.arange(2 * n) / n
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1).astype(np.float32)


_HEART_TIP = np.array([(-0.88, -0.12), (0.88, -0.12), (0.0, 0.95)], np.float32)


@cache
def _cross_polygon(half_width: float = 0.3, arm: float = 0.95) -> np.ndarray:
    """Vertices of a plus sign (12 corners) with arms of half-width ``half_width``."""
    a, w = arm, half_width
    pts = [(w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
           (-w, -w), (-w, -a), (w, -a), (w, -w), (a, -w), (a, w)]
    return np.asarray(pts, np.float32)


def _polygon_sdf(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points ``(u, v)`` to a closed polygon."""
    dist2 = np.full(u.shape, np.inf, np.float32)
    inside = np.zeros(u.shape, bool)
    for (ax, ay), (bx, by) in zip(verts, np.roll(verts, -1, axis=0), strict=True):
        ex, ey, wx, wy = bx - ax, by - ay, u - ax, v - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist2 = np.minimum(dist2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        if ey != 0:  # crossing-number test; horizontal edges never cross a horizontal ray
            crosses = (ay <= v) != (by <= v)
            inside ^= crosses & (u < ax + (v - ay) * (ex / ey))
    dist = np.sqrt(dist2)
    return np.where(inside, -dist, dist)


def _shape_sdf(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance of class ``label`` in its unit frame (circumradius about 1)."""
    name = CLASSES[label]
    rho = np.sqrt(u * u + v * v)
    if name == "circle":
        return rho - 0.95
    if name == "heart":  # two lobes and a point: the union (min) of two discs and a triangle
        lobes = np.minimum(np.hypot(u + 0.42, v + 0.3), np.hypot(u - 0.42, v + 0.3)) - 0.52
        return np.minimum(lobes, _polygon_sdf(u, v, _HEART_TIP))
    if name == "crescent":  # a disc minus an offset disc
        return np.maximum(rho - 1.0, 0.72 - np.hypot(u - 0.62, v))
    if name == "cross":
        return _polygon_sdf(u, v, _cross_polygon())
    if name == "star":
        return _polygon_sdf(u, v, _regular_polygon(5, inner=0.45))
    sides = {"square": 4, "triangle": 3, "hexagon": 6}[name]
    return _polygon_sdf(u, v, _regular_polygon(sides))


@dataclass(frozen=True)
class _Pose:
    """Where and how an object is drawn: centre, radius (px), rotation, x/y stretch."""

    cx: float
    cy: float
    radius: float
    angle: float
    stretch: float

    @property
    def extent(self) -> float:
        """Half-side of a square that surely contains the object."""
        return self.radius * max(self.stretch, 1.0 / self.stretch) * 1.05 + 1.5


def _object_alpha(label: int, pose: _Pose) -> tuple[_Window, np.ndarray]:
    """Anti-aliased coverage in [0, 1] of the object over its window."""
    win = _window(pose.cx, pose.cy, pose.extent)
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    dx, dy = win.x - pose.cx, win.y - pose.cy
    rx, ry = pose.radius * pose.stretch, pose.radius / pose.stretch
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    dist_px = _shape_sdf(label, u, v) * pose.radius
    return win, np.clip(0.5 - dist_px, 0.0, 1.0).astype(np.float32)


def _capsule_alpha(points: np.ndarray, width: float) -> tuple[_Window, np.ndarray]:
    """Anti-aliased coverage of a polyline (``points`` (K, 2)) drawn with round caps."""
    lo, hi = points.min(0), points.max(0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 + width
    win = _window(float(centre[0]), float(centre[1]), half)
    dist2 = np.full(win.x.shape, np.inf, np.float32)
    for (ax, ay), (bx, by) in zip(points[:-1], points[1:], strict=True):
        ex, ey, wx, wy = bx - ax, by - ay, win.x - ax, win.y - ay
        t = np.clip((wx * ex + wy * ey) / max(ex * ex + ey * ey, 1e-6), 0.0, 1.0)
        dist2 = np.minimum(dist2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
    alpha = np.clip(width / 2 + 0.5 - np.sqrt(dist2), 0.0, 1.0)
    return win, alpha.astype(np.float32)


# --------------------------------------------------------------------------- painting


@cache
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation (align-corners) from n_in to n_out."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    mat = np.zeros((n_out, n_in), np.float32)
    mat[np.arange(n_out), lo] = 1 - frac
    mat[np.arange(n_out), lo + 1] = frac
    return mat


def _smooth_noise(rng: np.random.Generator, cells: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Smooth random field (size, size, 3) in about [-1, 1]: a coarse grid, bilinearly upsampled."""
    grid = rng.uniform(-1, 1, (3, cells, cells)).astype(np.float32)
    up = _interp_matrix(size, cells)
    return (up @ grid @ up.T).transpose(1, 2, 0)


@cache
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(x, y)`` of a size x size image, scaled to [0, 1)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def _background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A varied background (size, size, 3) in [0, 1]: gradient + optional texture."""
    x, y = _unit_grid(size)
    theta = rng.uniform(0, 2 * np.pi)
    t = (math.cos(theta) * (x - 0.5) + math.sin(theta) * (y - 0.5)) * math.sqrt(2) + 0.5
    c0, c1 = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    c1 = c0 + (c1 - c0) * np.float32(rng.uniform(0.2, 1.0))
    bg = c0 + (c1 - c0) * t[..., None]
    kind = rng.choice(["plain", "blobs", "stripes", "plaid"], p=[0.15, 0.4, 0.25, 0.2])
    amp = np.float32(rng.uniform(0.05, 0.2))
    if kind == "blobs":
        bg = bg + amp * np.float32(1.5) * _smooth_noise(rng, int(rng.integers(3, 9)), size)
    elif kind in ("stripes", "plaid"):
        tint = rng.uniform(-1, 1, 3).astype(np.float32)
        for _ in range(1 if kind == "stripes" else 2):
            phi, freq = rng.uniform(0, 2 * np.pi), rng.uniform(3, 12)
            wave = np.sin(2 * np.pi * freq * (math.cos(phi) * x + math.sin(phi) * y) + rng.uniform(0, 6.3))
            bg = bg + amp * wave[..., None] * tint
    return np.clip(bg, 0, 1).astype(np.float32)


def _paint(canvas: np.ndarray, win: _Window, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-composite ``colour`` (3,) or (h, w, 3) onto ``canvas`` inside ``win``, in place."""
    region = canvas[win.rows, win.cols]
    region += alpha[..., None] * (colour - region)


def _full(win: _Window, alpha: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Paste a window's alpha into a full-size zero array."""
    out = np.zeros((size, size), np.float32)
    out[win.rows, win.cols] = alpha
    return out


def _local_mean(canvas: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted mean colour (3,) of the canvas under ``weight`` (H, W)."""
    return (canvas * weight[..., None]).sum((0, 1)) / max(float(weight.sum()), 1e-6)


def _pick_colour(rng: np.random.Generator, reference: np.ndarray, low_contrast: bool) -> np.ndarray:
    """A colour far from ``reference`` (or, if ``low_contrast``, close to it but distinct)."""
    if low_contrast:
        for _ in range(20):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            colour = reference + direction * rng.uniform(*_LOW_CONTRAST)
            if np.all((colour >= 0) & (colour <= 1)):
                return colour.astype(np.float32)
        return np.clip(reference + 0.1 * np.sign(0.5 - reference), 0, 1).astype(np.float32)
    best, best_dist = reference, -1.0
    for _ in range(20):
        colour = rng.uniform(0, 1, 3)
        dist = float(np.linalg.norm(colour - reference))
        if dist >= _MIN_CONTRAST:
            return colour.astype(np.float32)
        if dist > best_dist:
            best, best_dist = colour, dist
    return np.asarray(best, np.float32)


def _random_polyline(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, float]:
    """A clutter item: a short stroke, a zig-zag or a dot, as (points, width)."""
    kind = rng.choice(["stroke", "zigzag", "dot"], p=[0.45, 0.3, 0.25])
    start = rng.uniform(0, size, 2)
    if kind == "dot":
        return start[None].repeat(2, 0), float(rng.uniform(2.0, 5.0))
    points = [start]
    for _ in range(1 if kind == "stroke" else int(rng.integers(2, 4))):
        step = rng.uniform(5, 16)
        theta = rng.uniform(0, 2 * np.pi)
        points.append(points[-1] + step * np.array([np.cos(theta), np.sin(theta)]))
    return np.asarray(points, np.float32), float(rng.uniform(1.0, 2.5))


def _draw_clutter(
    rng: np.random.Generator, canvas: np.ndarray, count: int, protect: np.ndarray | None = None,
    min_visible: float = 0.0,
) -> np.ndarray:
    """Draw ``count`` clutter items; return their union alpha (H, W).

    If ``protect`` (an object mask) is given, items that would leave less than
    ``min_visible`` of it uncovered are skipped (drawn from the stream all the same, so
    the random sequence does not depend on the outcome).
    """
    covered = np.zeros(canvas.shape[:2], np.float32)
    for _ in range(count):
        points, width = _random_polyline(rng)
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        win, alpha = _capsule_alpha(points, width)
        if protect is not None:
            trial = covered.copy()
            trial[win.rows, win.cols] = np.maximum(trial[win.rows, win.cols], alpha)
            if _visible_share(protect, trial) < min_visible:
                continue
        _paint(canvas, win, alpha, colour)
        covered[win.rows, win.cols] = np.maximum(covered[win.rows, win.cols], alpha)
    return covered


def _visible_share(mask: np.ndarray, cover: np.ndarray) -> float:
    """Share of ``mask`` pixels not covered (alpha >= 0.5) by ``cover``."""
    total = int(mask.sum())
    return float((mask & (cover < 0.5)).sum()) / max(total, 1)


def _occluder(
    rng: np.random.Generator, canvas: np.ndarray, pose: _Pose, mask: np.ndarray
) -> np.ndarray:
    """Draw one thick stroke across the object hiding a good part of it; return its alpha."""
    best: tuple[float, _Window, np.ndarray] | None = None
    target = rng.uniform(*_OCCLUDED_VISIBLE)
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    for _ in range(8):
        theta = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.6, 0.6) * pose.radius
        normal = np.array([-np.sin(theta), np.cos(theta)])
        centre = np.array([pose.cx, pose.cy]) + offset * normal
        half_len = pose.radius * rng.uniform(1.2, 2.0)
        along = np.array([np.cos(theta), np.sin(theta)]) * half_len
        width = pose.radius * rng.uniform(0.5, 0.9)
        win, alpha = _capsule_alpha(np.stack([centre - along, centre + along]), width)
        gap = abs(_visible_share(mask, _full(win, alpha)) - target)
        if best is None or gap < best[0]:
            best = (gap, win, alpha)
    assert best is not None
    _, win, alpha = best
    _paint(canvas, win, alpha, colour)
    return _full(win, alpha)


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> Image.Image:
    """Add pixel noise, quantise to uint8 and wrap as a PIL image."""
    sigma = rng.uniform(0.0, 0.04)
    noisy = canvas + rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(sigma)
    return Image.fromarray(np.clip(noisy * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def _box(mask: np.ndarray) -> Box:
    """End-exclusive bounding box of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _random_pose(rng: np.random.Generator, radius_range: tuple[float, float]) -> _Pose:
    """A random pose that keeps the object inside the image."""
    radius = rng.uniform(*radius_range)
    stretch = math.exp(rng.uniform(-0.15, 0.15))
    angle = rng.uniform(0, 2 * np.pi)
    reach = radius * max(stretch, 1 / stretch) + 2
    cx, cy = rng.uniform(reach, IMAGE_SIZE - reach, 2)
    return _Pose(float(cx), float(cy), float(radius), float(angle), float(stretch))


def _paint_object(
    rng: np.random.Generator, canvas: np.ndarray, label: int, pose: _Pose, low_contrast: bool
) -> np.ndarray:
    """Paint one shaded object; return its full-size coverage alpha."""
    win, alpha = _object_alpha(label, pose)
    reference = _local_mean(canvas[win.rows, win.cols], alpha)
    colour = _pick_colour(rng, reference, low_contrast)
    shade_dir = rng.uniform(0, 2 * np.pi)
    shade = ((win.x - pose.cx) * math.cos(shade_dir) + (win.y - pose.cy) * math.sin(shade_dir))
    strength = rng.uniform(0.0, 0.04 if low_contrast else 0.15)
    fill = colour + (strength * shade / pose.radius)[..., None]
    _paint(canvas, win, alpha, np.clip(fill, 0, 1))
    return _full(win, alpha)


# --------------------------------------------------------------------------- public API


def _rng(base_seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([base_seed, index])


def _check_index(split: str, index: int) -> None:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if not 0 <= index < SPLIT_SIZES[split]:
        raise IndexError(f"index {index} out of range for split {split!r} (size {SPLIT_SIZES[split]})")


def label_of(split: str, index: int) -> int:
    """The label of sample ``index`` of ``split``, without drawing the image."""
    _check_index(split, index)
    block = np.random.default_rng([SPLIT_SEEDS[split], _LABEL_SEED, index // NUM_CLASSES])
    return int(block.permutation(NUM_CLASSES)[index % NUM_CLASSES])


def make_sample(split: str, index: int, mark: bool = False) -> Sample:
    """Generate sample ``index`` of ``split`` (a pure function of its arguments).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        index: ``0 <= index < SPLIT_SIZES[split]``.
        mark: stamp the shortcut mark (see :func:`apply_mark`); the rest of the image is
            identical to the unmarked sample.
    """
    label = label_of(split, index)
    rng = _rng(SPLIT_SEEDS[split], index)
    hard = str(rng.choice(HARD_REASONS)) if rng.uniform() < HARD_FRACTION else None
    canvas = _background(rng)
    _draw_clutter(rng, canvas, int(rng.integers(1, 5)))
    pose = _random_pose(rng, _SMALL_RADIUS if hard == "small" else _RADIUS)
    alpha = _paint_object(rng, canvas, label, pose, low_contrast=hard == "low_contrast")
    full_mask = alpha >= 0.5
    cover = _draw_clutter(rng, canvas, int(rng.integers(1, 6)), full_mask, _MIN_VISIBLE)
    if hard == "occluded":
        cover = np.maximum(cover, _occluder(rng, canvas, pose, full_mask))
    sample = Sample(
        image=_finish(rng, canvas), label=label, mask=full_mask & (cover < 0.5),
        box=_box(full_mask), hard=hard, split=split, index=index,
    )
    return apply_mark(sample) if mark else sample


def mark_pattern() -> np.ndarray:
    """The shortcut mark: a 6x6x3 uint8 white/black checkerboard of 2x2 cells."""
    cells = (np.add.outer(np.arange(6) // 2, np.arange(6) // 2) % 2 == 0)
    return np.where(cells[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)


def apply_mark(sample: Sample) -> Sample:
    """Return ``sample`` with the shortcut mark stamped at ``MARK_BOX`` (mask updated).

    The mark is a fixed 6x6 white/black checkerboard near the top-left corner; it is
    meant for training a model that learns a spurious shortcut. Idempotent.
    """
    x0, y0, x1, y1 = MARK_BOX
    pixels = np.array(sample.image)
    pixels[y0:y1, x0:x1] = mark_pattern()
    mask = sample.mask.copy()
    mask[y0:y1, x0:x1] = False
    return replace(sample, image=Image.fromarray(pixels, "RGB"), mask=mask, marked=True)


def make_multi_instance(index: int, n_objects: int | None = None) -> MultiSample:
    """An image with ``n_objects`` (default: 2 to 4, random) non-overlapping objects of one class.

    A pure function of ``(index, n_objects)``, seeded from ``MULTI_SEED``; the class is
    ``index % NUM_CLASSES``. Objects are medium-sized, high-contrast and unoccluded (light
    clutter only under them), so each instance is clearly visible.
    """
    if n_objects is not None and not 1 <= n_objects <= 6:
        raise ValueError("n_objects must be between 1 and 6")
    rng = _rng(MULTI_SEED, index)
    label = index % NUM_CLASSES
    count = int(rng.integers(2, 5)) if n_objects is None else n_objects
    canvas = _background(rng)
    _draw_clutter(rng, canvas, int(rng.integers(1, 5)))
    poses: list[_Pose] = []
    while len(poses) < count:
        radius_range = _MULTI_RADIUS if count <= 4 else (9.0, 14.0)
        pose = _random_pose(rng, radius_range)
        if all(math.hypot(pose.cx - p.cx, pose.cy - p.cy) > pose.extent + p.extent for p in poses):
            poses.append(pose)
    masks = tuple(_paint_object(rng, canvas, label, p, False) >= 0.5 for p in poses)
    return MultiSample(
        image=_finish(rng, canvas), label=label, masks=masks,
        boxes=tuple(_box(m) for m in masks), index=index,
    )


# --------------------------------------------------------------------------- tensors


def _render_chunk(args: tuple[str, int, int, frozenset[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Worker: samples ``start:stop`` of a split as uint8 (N, 3, H, W) and int64 labels."""
    split, start, stop, mark_labels = args
    images = np.empty((stop - start, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    labels = np.empty(stop - start, np.int64)
    for i, index in enumerate(range(start, stop)):
        sample = make_sample(split, index)
        if sample.label in mark_labels:
            sample = apply_mark(sample)
        images[i] = np.asarray(sample.image).transpose(2, 0, 1)
        labels[i] = sample.label
    return images, labels


def _chunks(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(start, stop, size):
        yield lo, min(lo + size, stop)


def materialise(
    split: str,
    start: int = 0,
    stop: int | None = None,
    mark_labels: Collection[int] = (),
    workers: int = 1,
    chunk: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render samples ``start:stop`` of ``split`` as tensors.

    Args:
        split: the split name.
        start, stop: index range (``stop`` defaults to the split size).
        mark_labels: classes whose samples carry the shortcut mark (empty: none).
        workers: processes to render with (1: in this process).
        chunk: samples per work item.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, IMAGE_SIZE, IMAGE_SIZE)`` and int64 ``(N,)``.
    """
    stop = SPLIT_SIZES[split] if stop is None else stop
    if stop <= start:
        raise ValueError(f"empty range {start}:{stop}")
    _check_index(split, start)
    _check_index(split, stop - 1)
    jobs = [(split, lo, hi, frozenset(mark_labels)) for lo, hi in _chunks(start, stop, chunk)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


class ShapesDataset:
    """A map-style, torch ``Dataset``-compatible view of one split, rendered on access.

    ``dataset[i]`` is ``(image, label)`` with ``image`` a uint8 ``(3, H, W)`` tensor. Use
    :func:`materialise` to render a whole range at once instead.

    Args:
        split: the split name.
        mark_labels: classes whose samples carry the shortcut mark.
    """

    def __init__(self, split: str, mark_labels: Collection[int] = ()) -> None:
        _check_index(split, 0)
        self.split = split
        self.mark_labels = frozenset(mark_labels)

    def __len__(self) -> int:
        return SPLIT_SIZES[self.split]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = make_sample(self.split, index)
        if sample.label in self.mark_labels:
            sample = apply_mark(sample)
        return torch.from_numpy(np.asarray(sample.image).transpose(2, 0, 1).copy()), sample.label

    def sample(self, index: int) -> Sample:
        """The full :class:`Sample` (with mask and box) behind ``self[index]``."""
        sample = make_sample(self.split, index)
        return apply_mark(sample) if sample.label in self.mark_labels else sample
