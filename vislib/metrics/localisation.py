"""Localisation metrics, where the truth is known (the generated data's masks, boxes).

* Pointing game (Zhang et al. 2016): :func:`pointing_hits`, with the image-centre baselines
  :func:`centre_hits` and :func:`centre_map`; :func:`per_class_mean` averages per class first, as the
  pointing game is reported.
* Energy inside the object: :func:`energy_inside`; relevance mass and rank accuracy (Arras et al.
  2022): :func:`relevance_mass`, :func:`relevance_rank`; one class per metric below.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import Metric, _as_tensor


def default_tolerance(height: int, width: int) -> int:
    """Pointing-game tolerance in pixels: Zhang et al.'s 15 px at a 224-px input, scaled to the
    input's shorter side (9 px at 128 px)."""
    return max(1, round(15 * min(height, width) / 224))


def peaks(maps, flat=None) -> tuple[np.ndarray, np.ndarray]:
    """(points, flat): the (y, x) position of each N×H×W map's maximum (N×2, the first maximum in
    raster order) and whether the map is constant (it has no maximum then; pass ``flat`` when it is
    already known, e.g. :attr:`vislib.Explanation.flat`)."""
    m = _as_tensor(maps, torch.float32)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    flat_maps = m.flatten(1)
    index = flat_maps.argmax(dim=1)
    if flat is None:
        is_flat = (flat_maps.amax(dim=1) <= flat_maps.amin(dim=1)).numpy()
    else:
        is_flat = np.asarray(flat, dtype=bool).reshape(-1)
    ys, xs = index // m.shape[-1], index % m.shape[-1]
    return np.stack([ys.numpy(), xs.numpy()], axis=1), is_flat


def distance_to_mask(points: np.ndarray, masks) -> np.ndarray:
    """Euclidean distance (px) from each point (y, x) to the nearest pixel of its N×H×W mask
    (inf for an empty mask)."""
    m = _as_tensor(masks, torch.bool)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    n, h, w = m.shape
    pts = torch.as_tensor(np.asarray(points), dtype=torch.float32).view(n, 2)
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    d2 = (yy - pts[:, 0].view(n, 1, 1)) ** 2 + (xx - pts[:, 1].view(n, 1, 1)) ** 2
    d2 = torch.where(m, d2, torch.full_like(d2, float("inf")))
    return d2.flatten(1).amin(dim=1).sqrt().numpy()


@functools.lru_cache(maxsize=16)
def _disk(radius: float) -> torch.Tensor:
    """K×2 integer offsets (dy, dx) with dy² + dx² ≤ radius²."""
    r = int(math.floor(radius))
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    keep = dy**2 + dx**2 <= radius**2
    return torch.stack([dy[keep], dx[keep]], dim=1)


def near_mask(points: np.ndarray, masks, tolerance: float) -> np.ndarray:
    """Whether each point (y, x) lies within ``tolerance`` px of a pixel of its N×H×W mask: the
    mask is looked up at the disk of offsets around the point only (cheap: no distance map), which is
    the same test as ``distance_to_mask(points, masks) <= tolerance``. One H×W mask serves all."""
    m = _as_tensor(masks, torch.bool)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    _, h, w = m.shape
    pts = torch.as_tensor(np.asarray(points), dtype=torch.long).view(-1, 2)
    n = pts.shape[0]
    flat_masks = m.reshape(m.shape[0], -1)
    if flat_masks.shape[0] == 1 and n > 1:  # one mask for every point
        flat_masks = flat_masks.expand(n, -1)
    disk = _disk(float(tolerance))
    ys = pts[:, :1] + disk[:, 0]
    xs = pts[:, 1:] + disk[:, 1]
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    index = ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)
    return (flat_masks.gather(1, index) & inside).any(dim=1).numpy()


def pointing_hits(maps, masks, tolerance: float | None = None, *, flat=None) -> np.ndarray:
    """Pointing game (Zhang et al. 2016), per image: True when the map's maximum lies within
    ``tolerance`` px of the object mask (default :func:`default_tolerance`). A constant map has no
    maximum and misses."""
    pts, is_flat = peaks(maps, flat)
    m = _as_tensor(masks, torch.bool)
    h, w = m.shape[-2:]
    tol = default_tolerance(h, w) if tolerance is None else tolerance
    return near_mask(pts, m, tol) & ~is_flat


def centre_hits(masks, tolerance: float | None = None) -> np.ndarray:
    """The image-centre baseline of the pointing game: always point at the centre pixel."""
    m = _as_tensor(masks, torch.bool)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    n, h, w = m.shape
    tol = default_tolerance(h, w) if tolerance is None else tolerance
    pts = np.tile(np.array([[h // 2, w // 2]]), (n, 1))
    return near_mask(pts, m, tol)


def energy_inside(maps, masks) -> np.ndarray:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM §5.2), per image: the share of the
    map's mass inside the object mask, Σ M·1[mask] / Σ M, with M clipped at 0 (0 for a zero map)."""
    m = _as_tensor(maps, torch.float32)
    k = _as_tensor(masks, torch.float32)
    if m.dim() == 2:
        m, k = m.unsqueeze(0), k.unsqueeze(0)
    if m.shape[0] == 1 and k.shape[0] > 1:  # one map (e.g. the centre baseline) for every mask
        m = m.expand(k.shape[0], -1, -1)
    if k.shape[0] == 1 and m.shape[0] > 1:
        k = k.expand(m.shape[0], -1, -1)
    m = m.flatten(1)
    if bool((m < 0).any()):
        m = m.clamp_min(0)
    total = m.sum(dim=1, dtype=torch.float64)
    inside = (m * k.flatten(1)).sum(dim=1, dtype=torch.float64)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total)).numpy()


def centre_map(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """The image-centre baseline map: an isotropic Gaussian at the centre, σ = ``sigma`` × the
    shorter side, peak 1."""
    s = sigma * min(height, width)
    yy = np.arange(height, dtype=np.float32)[:, None] - (height - 1) / 2
    xx = np.arange(width, dtype=np.float32)[None, :] - (width - 1) / 2
    return np.exp(-(yy**2 + xx**2) / (2 * s * s)).astype(np.float32)


def per_class_mean(values, labels) -> float:
    """Mean over classes of the per-class mean (Zhang et al. report the pointing game this way);
    NaN values and classes without a value are left out."""
    v = np.asarray(values, dtype=np.float64)
    lab = np.asarray(labels)
    means = [np.nanmean(v[lab == c]) for c in np.unique(lab) if np.isfinite(v[lab == c]).any()]
    return float(np.mean(means)) if means else float("nan")




# --------------------------------------------------------------------------------------------------
# The metric classes (the same call as every metric; masks required)


def _masks(masks, n: int, size) -> torch.Tensor:
    k = _as_tensor(masks, torch.bool)
    if k.dim() == 2:
        k = k.unsqueeze(0).expand(n, -1, -1)
    if tuple(k.shape[-2:]) != tuple(size):
        raise ValueError(f"masks of {tuple(k.shape[-2:])} for maps of {tuple(size)}")
    return k


def relevance_mass(maps, masks) -> np.ndarray:
    """Relevance Mass Accuracy (Arras, Osman & Samek 2022): Σ_{i∈GT} R_i / Σ_i R_i per map (R as
    given, as Quantus; NaN for a zero map)."""
    m = _as_tensor(maps).flatten(1) if _as_tensor(maps).dim() > 2 else _as_tensor(maps).flatten()[None]
    k = _masks(masks, m.shape[0], _as_tensor(maps).shape[-2:]).flatten(1).double()
    total = m.sum(1)
    return torch.where(total != 0, (m * k).sum(1) / total, torch.full_like(total, float("nan"))).numpy()


def relevance_rank(maps, masks) -> np.ndarray:
    """Relevance Rank Accuracy (Arras et al. 2022): of the |GT| pixels with the highest relevance, the
    share inside GT (ties in raster order)."""
    m = _as_tensor(maps)
    m = m.flatten(1) if m.dim() > 2 else m.flatten()[None]
    k = _masks(masks, m.shape[0], _as_tensor(maps).shape[-2:]).flatten(1)
    out = np.full(m.shape[0], np.nan)
    order = torch.argsort(-m, dim=1, stable=True)
    for i in range(m.shape[0]):
        size = int(k[i].sum())
        if size:
            out[i] = float(k[i, order[i, :size]].double().mean())
    return out


@dataclass(kw_only=True)
class _Localisation(Metric):
    group: ClassVar[str] = "localisation"
    needs_model: ClassVar[bool] = False
    needs_masks: ClassVar[bool] = True
    centre_applies: ClassVar[bool] = True


@dataclass(kw_only=True)
class PointingGame(_Localisation):
    """Pointing game (Zhang et al. 2016): 1 when the map's maximum lies within ``tolerance`` px of the
    object (default :func:`default_tolerance`, 15 px at 224 px; Quantus: 0 px), else 0."""

    name: ClassVar[str] = "pointing_game"
    tolerance: float | None = None

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        self._require(masks=masks)
        return pointing_hits(maps, masks, self.tolerance).astype(np.float64)


@dataclass(kw_only=True)
class EnergyPointingGame(_Localisation):
    """Energy-based pointing game (Wang et al. 2020, Score-CAM §5.2): Σ M·1[object] / Σ M with M
    clipped at 0 (:func:`energy_inside`); with a box as the object mask."""

    name: ClassVar[str] = "energy_pointing_game"

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        self._require(masks=masks)
        return energy_inside(maps, masks)


@dataclass(kw_only=True)
class RelevanceMass(_Localisation):
    """Relevance Mass Accuracy (Arras et al. 2022): :func:`relevance_mass`."""

    name: ClassVar[str] = "relevance_mass"

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        self._require(masks=masks)
        return relevance_mass(maps, masks)


@dataclass(kw_only=True)
class RelevanceRankAccuracy(_Localisation):
    """Relevance Rank Accuracy (Arras et al. 2022): :func:`relevance_rank`."""

    name: ClassVar[str] = "relevance_rank_accuracy"

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        self._require(masks=masks)
        return relevance_rank(maps, masks)
