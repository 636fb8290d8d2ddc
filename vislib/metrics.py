"""Metrics for explanation maps: similarity, faithfulness and localisation.

Definitions follow /work/shared/METHODS.md; every function states its formula and paper.

* Similarity of two maps: :func:`spearman` (rank correlation) and :func:`ssim` (structural
  similarity), as in the Adebayo et al. (2018) sanity checks.
* Confidence (Chattopadhay et al. 2018): :func:`average_drop`, :func:`increase_in_confidence` from the
  class confidence on the image (Y) and on ``map ⊙ image`` (O, :func:`masked_confidence`).
* Deletion / insertion (Petsiuk et al. 2018): :func:`deletion_insertion` gives both curves for a
  batch of images from batched substrates; :func:`auc` the trapezoid area.
* Localisation, where an object mask exists: :func:`pointing_hits` (Zhang et al. 2016) and
  :func:`energy_inside`, with the image-centre baselines :func:`centre_hits` and :func:`centre_map`;
  :func:`per_class_mean` averages per class first, as the pointing game is reported.

Pure functions take arrays or tensors; the model-querying ones take a ``ModelBundle`` or an
``nn.Module`` and run without gradients on the model's device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(value, dtype=torch.float64) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Similarity of two maps


def rankdata(values) -> torch.Tensor:
    """Ranks 1..n of a flattened array, ties given the mean of the ranks they span ("average")."""
    x = _as_tensor(values).flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    # start of each run of equal values, then the mean rank of the run
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run, 0) - 1
    starts = torch.nonzero(new_run).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    mean_rank = (starts + ends + 1).double() / 2.0  # mean of start+1 .. end (1-based)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(a, b, *, absolute: bool = False) -> float:
    """Spearman rank correlation ρ of two maps (any shape, same number of elements).

    ρ = Pearson correlation of the ranks (ties: average ranks). ``absolute=True`` ranks |a| and |b|
    (the "with absolute value" variant of Adebayo et al. 2018). NaN when either map is constant.
    """
    x, y = _as_tensor(a).flatten(), _as_tensor(b).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"maps differ in size: {x.numel()} vs {y.numel()} values")
    if absolute:
        x, y = x.abs(), y.abs()
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def _gaussian_window(size: int, sigma: float, dtype=torch.float64) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b, *, data_range: float | None = None, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity (Wang et al. 2004) of two H×W maps.

    SSIM(x, y) = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)), with local
    statistics under a ``window``-wide Gaussian (σ = ``sigma``, windows wholly inside the image:
    "valid" mode), C1 = (k1·L)², C2 = (k2·L)², L = ``data_range`` (default: the joint range of the
    two maps, 1 when both are constant), averaged over positions. Maps smaller than the window use
    a window as large as the smaller side (made odd).
    """
    x, y = _as_tensor(a), _as_tensor(b)
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"ssim needs two H×W maps of one shape, not {tuple(x.shape)} and {tuple(y.shape)}")
    if data_range is None:
        lo, hi = min(float(x.min()), float(y.min())), max(float(x.max()), float(y.max()))
        data_range = hi - lo if hi > lo else 1.0
    size = min(window, *x.shape)
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma)
    kernel = (g[:, None] * g[None, :]).view(1, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t.view(1, 1, *t.shape), kernel)[0, 0]

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return float((num / den).mean())


# --------------------------------------------------------------------------------------------------
# Confidence: Average Drop % and % Increase in Confidence (Chattopadhay et al. 2018, §4.1)


def average_drop(y, o) -> float:
    """Average Drop % = 100 · mean_i max(0, Y_i − O_i) / Y_i.

    ``y``: the softmax confidence of the explained class on each image, ``o``: on ``map ⊙ image``.
    Lower is better: the map kept what the model needed.
    """
    y, o = _as_tensor(y).flatten(), _as_tensor(o).flatten()
    if y.numel() == 0:
        return float("nan")
    return float(100.0 * ((y - o).clamp_min(0) / y.clamp_min(1e-12)).mean())


def increase_in_confidence(y, o) -> float:
    """% Increase in Confidence = 100 · share of images with O_i > Y_i. Higher is better."""
    y, o = _as_tensor(y).flatten(), _as_tensor(o).flatten()
    if y.numel() == 0:
        return float("nan")
    return float(100.0 * (o > y).double().mean())


# --------------------------------------------------------------------------------------------------
# Curves


def auc(values, fractions=None) -> float:
    """Trapezoid area under ``values`` sampled at ``fractions`` of [0, 1] (default: evenly spaced)."""
    y = _as_tensor(values).flatten()
    if y.numel() < 2:
        raise ValueError("a curve needs at least two points")
    if fractions is None:
        x = torch.linspace(0.0, 1.0, y.numel(), dtype=torch.float64)
    else:
        x = _as_tensor(fractions).flatten()
    return float(torch.trapezoid(y, x))


# --------------------------------------------------------------------------------------------------
# Localisation: pointing game and energy inside the object


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
# Metrics that query the model (batched forwards, no gradients)


def _module(model) -> torch.nn.Module:
    return getattr(model, "model", model)  # a ModelBundle or an nn.Module


def _scores(model):
    """The forward giving class scores: a bundle's (its output selection applied), or the module's."""
    return model.logits if hasattr(model, "logits") and hasattr(model, "model") else model


def _device(module: torch.nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def target_probabilities(model, inputs: torch.Tensor, targets, *, batch_size: int = 128,
                         cancel=None) -> torch.Tensor:
    """Softmax probability of ``targets[i]`` on ``inputs[i]`` (N,), in batches, on the model's device."""
    forward = _scores(model)
    device = _device(_module(model))
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).view(-1)
    out = []
    with torch.no_grad():
        for lo in range(0, inputs.shape[0], batch_size):
            _check(cancel)
            logits = forward(inputs[lo:lo + batch_size].to(device, torch.float32)).float()
            probs = F.softmax(logits, dim=1)
            out.append(probs.gather(1, targets[lo:lo + batch_size].to(device).view(-1, 1)).squeeze(1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def _check(cancel) -> None:
    if cancel is not None and cancel.is_set():
        from .errors import Cancelled

        raise Cancelled("cancelled by the caller")


def _at_input_size(maps, size: tuple[int, int], device) -> torch.Tensor:
    m = _as_tensor(maps, torch.float32).to(device)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return m


def masked_confidence(model, inputs: torch.Tensor, maps, targets, *, batch_size: int = 128,
                      cancel=None) -> torch.Tensor:
    """O_i: the class confidence on ``map ⊙ image``, the explanation map (in [0, 1], upsampled
    bilinearly if needed) multiplying the input in the model's normalised space, where 0 is the
    dataset mean colour (the same convention as the deletion substrate)."""
    m = _at_input_size(maps, (inputs.shape[-2], inputs.shape[-1]), inputs.device)
    return target_probabilities(model, inputs * m.unsqueeze(1), targets, batch_size=batch_size, cancel=cancel)


def gaussian_blur(inputs: torch.Tensor, kernel: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Per-channel Gaussian blur (``kernel``×``kernel``, σ = ``sigma``) with reflected borders: the
    insertion substrate of RISE (Petsiuk et al. 2018 use kernel 11, σ 5)."""
    g = _gaussian_window(kernel, sigma, torch.float32).to(inputs.device)
    c = inputs.shape[1]
    pad = kernel // 2
    x = F.pad(inputs.float(), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(x, g.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


@dataclass
class Curves:
    """Deletion and insertion curves of N images: the class probability after removing (deletion)
    or inserting (insertion) the ``fractions`` of pixels with the highest saliency."""

    fractions: np.ndarray  # (K+1,) in [0, 1]
    deletion: np.ndarray  # N×(K+1)
    insertion: np.ndarray  # N×(K+1)

    @property
    def deletion_auc(self) -> np.ndarray:
        return np.array([auc(c, self.fractions) for c in self.deletion])

    @property
    def insertion_auc(self) -> np.ndarray:
        return np.array([auc(c, self.fractions) for c in self.insertion])


def saliency_ranks(maps: torch.Tensor) -> torch.Tensor:
    """N×(H·W) rank of every pixel, 0 for the most salient (ties kept in raster order)."""
    flat = maps.flatten(1)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def deletion_insertion(model, inputs: torch.Tensor, maps, targets, *, steps: int = 32,
                       blur: tuple[int, float] = (11, 5.0), batch_size: int = 128, progress=None,
                       cancel=None) -> Curves:
    """RISE deletion and insertion curves (Petsiuk et al. 2018) for N images at once.

    Pixels are ordered by the map (upsampled bilinearly to the input if needed), most salient first.
    At step k = 0..K (K = ``steps``), the first n_k = round(k·P/K) pixels of the P are replaced by
    the deletion substrate (zeros in the normalised input space: the mean colour) or, for
    insertion, revealed on the substrate (the image blurred with ``blur`` = (kernel, σ)). The curve
    is the softmax probability of the class; the area under it (trapezoid over the fraction of
    pixels, :attr:`Curves.deletion_auc`) is lower for a better deletion and higher for a better
    insertion. All 2K + 1 perturbed inputs of an image (deletion at k = 0 and insertion at k = K are
    the image itself) are batched.
    """
    forward = _scores(model)
    device = _device(_module(model))
    inputs = inputs.to(device, torch.float32)
    n, _, h, w = inputs.shape
    pixels = h * w
    m = _at_input_size(maps, (h, w), device)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).view(-1)
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * pixels / steps).long().to(device)
    substrate = gaussian_blur(inputs, *blur)
    deletion = np.empty((n, steps + 1), np.float32)
    insertion = np.empty((n, steps + 1), np.float32)
    per_image = 2 * steps + 1
    chunk = max(1, batch_size // per_image)
    with torch.no_grad():
        for lo in range(0, n, chunk):
            _check(cancel)
            hi = min(n, lo + chunk)
            x = inputs[lo:hi].unsqueeze(1)  # c×1×3×H×W
            ranks = saliency_ranks(m[lo:hi]).view(hi - lo, 1, 1, h, w)
            sel = ranks < counts.view(1, -1, 1, 1, 1)  # c×(K+1)×1×H×W: the first n_k pixels
            removed = torch.where(sel, torch.zeros((), device=device), x)  # c×(K+1)×3×H×W
            inserted = torch.where(sel[:, :-1], x, substrate[lo:hi].unsqueeze(1))  # c×K×3×H×W
            batch = torch.cat([removed, inserted], dim=1).flatten(0, 1)
            probs = []
            for start in range(0, batch.shape[0], batch_size):
                logits = forward(batch[start:start + batch_size]).float()
                probs.append(F.softmax(logits, dim=1))
            p = torch.cat(probs).view(hi - lo, per_image, -1)
            t = targets[lo:hi].to(device).view(-1, 1, 1).expand(-1, per_image, 1)
            scores = p.gather(2, t).squeeze(2).cpu().numpy()
            deletion[lo:hi] = scores[:, :steps + 1]
            insertion[lo:hi, :steps] = scores[:, steps + 1:]
            insertion[lo:hi, steps] = scores[:, 0]
            if progress is not None:
                progress(hi, n)
    return Curves((counts.double() / pixels).cpu().numpy(), deletion, insertion)
